"""Each shared fixture does what it promises, and leaves nothing behind."""

import subprocess
import urllib.request

import pytest
from harness.etcd import EtcdCluster, count_keys, etcd_request, b64
from harness.libvirtd import libvirt_answers
from harness.netns import NetnsFactory, netns_list

pytestmark = pytest.mark.integration


def test_etcd_fixture_serves_a_private_prefix(etcd):
    etcd_request(etcd.endpoints[0], "kv/put", {"key": b64(etcd.prefix + "/probe"), "value": b64("1")})
    assert etcd.key_count() == 1
    answer = etcd_request(etcd.endpoints[0], "kv/range", {"key": b64(etcd.prefix + "/probe")})
    assert answer["kvs"][0]["value"] == b64("1")


def test_etcd_cluster_members_agree_and_stop(tmp_path):
    cluster = EtcdCluster(tmp_path / "not-yet-there", size=3)
    try:
        members = etcd_request(cluster.endpoints[0], "cluster/member/list", {})["members"]
        assert len(members) == 3
        etcd_request(cluster.endpoints[0], "kv/put", {"key": b64("/k"), "value": b64("v")})
        assert count_keys(cluster.endpoints[2], "/k") == 1  # written on one member, read on another
    finally:
        cluster.stop()
    assert all(member.process.poll() is not None for member in cluster.members)


def test_libvirtd_fixture_answers(libvirtd):
    assert libvirt_answers(libvirtd.uri)
    listing = subprocess.run(
        ["virsh", "-c", libvirtd.uri, "list", "--all"], capture_output=True, text=True, check=False
    )
    assert listing.returncode == 0, listing.stderr


def test_netns_factory_always_deletes():
    factory = NetnsFactory()
    name = factory.create()
    assert name in netns_list()
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "300"])
    factory.cleanup()
    assert name not in netns_list()
    assert sleeper.wait(timeout=10) != 0  # the process inside was killed, not left running


def test_http_server_serves_a_directory(http_server, tmp_path):
    (tmp_path / "hello.txt").write_text("hello")
    server = http_server(tmp_path)
    with urllib.request.urlopen(server.url("hello.txt"), timeout=5) as response:
        assert response.read() == b"hello"
    assert server.requests[0][:2] == ("GET", "/hello.txt")


def test_ansible_driver_returns_module_results(ansible, tmp_path):
    target = tmp_path / "file.txt"
    args = {"path": str(target), "state": "touch"}
    checked = ansible.run_module("ansible.builtin.file", args, check=True)
    assert checked["changed"] is True and not target.exists()  # check mode reached the module
    applied = ansible.run_module("ansible.builtin.file", args)
    assert applied["changed"] is True and target.exists()
    failed = ansible.run_module("ansible.builtin.file", {"path": str(tmp_path / "no" / "such"), "state": "file"})
    assert failed["failed"] is True and "no/such" in failed["msg"]


def test_etcd_cluster_fixture_starts_members(etcd_cluster):
    cluster = etcd_cluster(3)
    assert len(etcd_request(cluster.endpoints[1], "cluster/member/list", {})["members"]) == 3
