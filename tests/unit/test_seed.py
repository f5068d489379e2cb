"""The NoCloud seed: meta-data, user-data checks, network-config, hostnames, sizes of disks."""

import json
import shutil

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import disks, seed
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import instance_spec as instances
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import cached as images
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

pytestmark = pytest.mark.unit

yaml = pytest.importorskip("yaml")


def test_meta_data_is_yaml_with_id_hostname_and_keys():
    text = seed.meta_data("uuid-1", "web1", ["ssh-ed25519 AAAA x@y"])
    assert yaml.safe_load(text) == {"instance-id": "uuid-1", "local-hostname": "web1",
                                    "public-keys": ["ssh-ed25519 AAAA x@y"]}
    # The tiny guest reads it with sed: one "key: value" per line.
    assert 'local-hostname: "web1"' in text.splitlines()


def test_network_config_takes_dhcp_on_every_mac_in_order():
    config = yaml.safe_load(seed.network_config(["02:00:00:00:00:01", "02:00:00:00:00:02"]))
    assert config["version"] == 2
    assert config["ethernets"]["eth1"] == {"match": {"macaddress": "02:00:00:00:00:02"}, "set-name": "eth1",
                                           "dhcp4": True}


@pytest.mark.parametrize("given, expected_start", [
    (None, "#cloud-config\n"),
    ("", "#cloud-config\n"),
    ("#cloud-config\npackages: [curl]\n", "#cloud-config\npackages"),
    ("packages: [curl]", "#cloud-config\npackages"),
    ("#!/bin/sh\necho hi", "#!/bin/sh"),
])
def test_user_data_accepted(given, expected_start):
    text = seed.check_user_data(given)
    assert text.startswith(expected_start) and text.endswith("\n")


@pytest.mark.parametrize("given, message", [
    ("#cloud-config\nkey: [unclosed\n", "not valid YAML"),
    ("- a\n- list\n", "not cloud-config"),
    ("just a string", "not cloud-config"),
])
def test_user_data_rejected(given, message):
    with pytest.raises(InvalidInput) as caught:
        seed.check_user_data(given)
    assert message in caught.value.msg


@pytest.mark.parametrize("name, hostname", [("web1", "web1"), ("web_1.a", "web-1-a"), ("_x", "x")])
def test_hostname_from_name(name, hostname):
    assert seed.hostname_for(name) == hostname
    assert seed.check_hostname(hostname) == hostname


@pytest.mark.parametrize("bad", ["-x", "a_b", "x" * 64, "", "a..b"])
def test_bad_hostnames(bad):
    with pytest.raises(InvalidInput):
        seed.check_hostname(bad)


def test_ssh_keys_must_be_public_key_lines():
    assert seed.check_ssh_keys([" ssh-rsa AAAA k "]) == ["ssh-rsa AAAA k"]
    with pytest.raises(InvalidInput) as caught:
        seed.check_ssh_keys(["-----BEGIN OPENSSH PRIVATE KEY-----"])
    assert "not an OpenSSH public key" in caught.value.msg


def test_digest_changes_with_any_file():
    files = seed.seed_files("id", "h", [], None, ["02:00:00:00:00:01"])
    assert seed.digest(files) == seed.digest(dict(files))
    assert seed.digest(files) != seed.digest(seed.seed_files("id", "h2", [], None, ["02:00:00:00:00:01"]))


def test_vendor_data_lets_cloud_init_manage_etc_hosts_under_user_data():
    files = seed.seed_files("id", "h", [], "manage_etc_hosts: false\n", ["02:00:00:00:00:01"])
    vendor = yaml.safe_load(files["vendor-data"])
    assert files["vendor-data"].startswith("#cloud-config\n") and vendor == {"manage_etc_hosts": True}
    # The user's own setting travels in user-data, which cloud-init merges over vendor-data.
    assert yaml.safe_load(files["user-data"]) == {"manage_etc_hosts": False}


@pytest.mark.parametrize("value, size", [
    ("10G", 10 * 1024 ** 3), ("512M", 512 * 1024 ** 2), ("20GiB", 20 * 1024 ** 3), ("2", 2 * 1024 ** 3),
    (3, 3 * 1024 ** 3), ("1.5G", 1536 * 1024 ** 2),
])
def test_parse_size(value, size):
    assert disks.parse_size(value) == size


@pytest.mark.parametrize("value", ["ten", "10X", "-1G", "0", "100K", True])
def test_parse_size_rejects(value):
    with pytest.raises(InvalidInput):
        disks.parse_size(value)


def test_qcow2_header_is_read_without_qemu_img(tmp_path):
    import struct

    path = tmp_path / "d.qcow2"
    backing = b"/base.qcow2"
    header = b"QFI\xfb" + struct.pack(">IQI", 3, 104, len(backing)) + struct.pack(">IQ", 16, 5 * 1024 ** 3)
    path.write_bytes(header.ljust(104, b"\0") + backing)
    assert disks.qcow2_header(str(path)) == {"virtual_size": 5 * 1024 ** 3, "backing_file": "/base.qcow2"}
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 4096)
    assert disks.qcow2_header(str(raw)) is None and disks.virtual_size(str(raw)) == 4096


BASE = dict.fromkeys(instances.INSTANCE_OPTIONS)
BASE.update(instances.DEFAULTS, image="/i.qcow2", instances=None, detected_virt_type=None, wait_for="none",
            wait_timeout=300)


def params(**extra):
    merged = dict(BASE)
    merged.update(extra)
    return merged


def test_batch_entries_inherit_top_level_options():
    wanted = instances.expand(params(cpus=2, instances=[{"name": "a"}, {"name": "b", "cpus": 4, "networks": [
        "n1", {"name": "n2", "ip": "10.0.0.9"}]}]))
    assert [w["cpus"] for w in wanted] == [2, 4]
    assert wanted[1]["networks"] == [("n1", None), ("n2", "10.0.0.9")]
    assert wanted[0]["virt_type"] == "qemu"


@pytest.mark.parametrize("extra, message", [
    (dict(name="a/b"), "'a/b' is not allowed"),
    (dict(name="a", cpus=0), "cpus 0 is out of range"),
    (dict(name="a", memory=8), "memory 8 MiB is out of range"),
    (dict(name="a", networks=[{"name": "n", "mask": 1}]), "networks entry"),
    (dict(name="a", networks=["n", "n"]), "listed more than once"),
    (dict(name="a", networks=[{"name": "n", "ip": "300.1.1.1"}]), "300.1.1.1"),
    (dict(instances=[{"name": "a"}, {"name": "a"}]), "instance a is listed more than once"),
    (dict(instances=[{"name": "a", "networks": [{"name": "n", "ip": "10.0.0.5"}]},
                     {"name": "b", "networks": [{"name": "n", "ip": "10.0.0.5"}]}]), "requested by both a and b"),
    (dict(instances=[{"name": "a", "colour": "red"}]), "unknown keys colour"),
    (dict(instances=[{"name": "a", "cpus": "many"}]), "cpus"),
    (dict(name="a", metadata={"count": 3}), "metadata value of count is 3 (int); metadata values must be strings"),
    (dict(name="a", metadata={"on": True}), "metadata value of on is True (bool)"),
    (dict(name="a", metadata={"a b": "x"}), "metadata key 'a b' is not allowed"),
    (dict(instances=[{"name": "a", "metadata": {"n": 1.5}}]), "metadata value of n is 1.5"),
    (dict(name="a", wait_for="ssh", wait_timeout=-5), "wait_timeout -5 must be >= 0 seconds"),
])
def test_expand_rejects(extra, message):
    with pytest.raises(InvalidInput) as caught:
        instances.expand(params(**extra))
    assert message in caught.value.msg


def test_metadata_is_kept_per_instance_over_the_top_level_default():
    wanted = instances.expand(params(metadata={"role": "web"}, instances=[
        {"name": "a"}, {"name": "b", "metadata": {"role": "db", "owner": "ops"}}]))
    assert [w["metadata"] for w in wanted] == [{"role": "web"}, {"role": "db", "owner": "ops"}]


@pytest.mark.parametrize("asked, detected, result", [
    ("auto", None, "qemu"), ("auto", "kvm", "kvm"), ("qemu", "kvm", "qemu"), ("kvm", None, "kvm"),
])
def test_virt_type(asked, detected, result):
    assert instances.resolve_virt_type(asked, detected) == result


def test_image_urls():
    assert images.image_url("/srv/x.qcow2") == ("file:///srv/x.qcow2", None)
    assert images.image_url("https://h/x.img") == ("https://h/x.img", None)
    assert images.image_url("debian:12") == (None, "debian:12")


def test_meta_data_strings_are_json_quoted():
    text = seed.meta_data('id"1', "h", [])
    assert json.loads(text.splitlines()[0].split(": ", 1)[1]) == 'id"1'


@pytest.mark.skipif(shutil.which("genisoimage") is None, reason="genisoimage (Debian: genisoimage) builds the ISO")
def test_writing_a_seed_removes_the_scratch_directory_of_a_run_killed_while_writing_one(tmp_path):
    killed = tmp_path / ".seed-abc123"
    (killed / "content").mkdir(parents=True)
    seed.write_iso(str(tmp_path / "seed.iso"), {"meta-data": "instance-id: x\n"})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["seed.iso"]
