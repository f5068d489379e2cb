"""Catalog resolution: built-in names, user entries from the option and from a file, bad names."""

import json

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import catalog
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("name", "url", "sums"),
    [
        ("debian:12", "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-generic-amd64.qcow2",
         "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"),
        ("debian:11", "https://cloud.debian.org/images/cloud/bullseye/latest/debian-11-generic-amd64.qcow2",
         "https://cloud.debian.org/images/cloud/bullseye/latest/SHA512SUMS"),
        ("debian:bookworm", "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-generic-amd64.qcow2",
         "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"),
        ("ubuntu:22.04", "https://cloud-images.ubuntu.com/releases/22.04/release/ubuntu-22.04-server-cloudimg-amd64.img",
         "https://cloud-images.ubuntu.com/releases/22.04/release/SHA256SUMS"),
        ("ubuntu:24.04", "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img",
         "https://cloud-images.ubuntu.com/releases/24.04/release/SHA256SUMS"),
        ("ubuntu:noble", "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img",
         "https://cloud-images.ubuntu.com/releases/24.04/release/SHA256SUMS"),
    ],
)
def test_builtin_names(name, url, sums):
    assert catalog.resolve(name) == {"url": url, "checksum_url": sums}


def test_user_entries_extend_and_override():
    user = {
        "debian:12": {"url": "http://mirror.lan/debian-12.qcow2", "checksum_url": "http://mirror.lan/SHA512SUMS"},
        "site:tiny": "http://mirror.lan/tiny.raw.xz",
        "site:pinned": {"url": "http://mirror.lan/p.img", "checksum": "sha256:" + "a" * 64, "description": "x"},
    }
    assert catalog.resolve("debian:12", user)["url"] == "http://mirror.lan/debian-12.qcow2"
    assert catalog.resolve("site:tiny", user) == {"url": "http://mirror.lan/tiny.raw.xz"}
    assert catalog.resolve("site:pinned", user)["checksum"] == "sha256:" + "a" * 64
    assert catalog.resolve("ubuntu:24.04", user) == catalog.resolve("ubuntu:24.04")  # untouched


@pytest.mark.parametrize("suffix", [".yml", ".json"])
def test_catalog_file_yaml_and_json(tmp_path, suffix):
    entries = {"lab:img": {"url": "http://lab/img.qcow2", "checksum_url": "http://lab/SHA256SUMS"},
               "debian:12": "http://lab/d12.qcow2"}
    path = tmp_path / ("catalog" + suffix)
    path.write_text(json.dumps(entries))  # JSON is YAML too
    assert catalog.resolve("lab:img", catalog_file=str(path))["checksum_url"] == "http://lab/SHA256SUMS"
    assert catalog.resolve("debian:12", catalog_file=str(path)) == {"url": "http://lab/d12.qcow2"}
    # The task's mapping wins over the file.
    assert catalog.resolve("debian:12", {"debian:12": "http://task/d12"}, str(path)) == {"url": "http://task/d12"}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InvalidInput) as failure:
        catalog.resolve("fedora:40", {"site:tiny": "http://x/y"})
    assert "unknown image name 'fedora:40'" in failure.value.msg
    known = set(failure.value.details["known"])
    assert {"debian:11", "debian:12", "ubuntu:22.04", "ubuntu:24.04", "site:tiny"} <= known
    assert "debian:12" in failure.value.msg


@pytest.mark.parametrize("name", ["../../etc/passwd", "debian:12/../x", "", "a b", "/abs", "x:y:z", "-rf"])
def test_names_that_are_not_catalog_names(name):
    with pytest.raises(InvalidInput) as failure:
        catalog.resolve(name)
    assert repr(name) in failure.value.msg


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [({"checksum_url": "http://x/S"}, "needs a 'url'"), ({"url": "http://x", "sha": "1"}, "unknown keys ['sha']"),
     (42, "needs a 'url'")],
)
def test_bad_user_entries(entry, fragment):
    with pytest.raises(InvalidInput) as failure:
        catalog.resolve("site:x", {"site:x": entry})
    assert fragment in failure.value.msg and "site:x" in failure.value.msg


def test_bad_catalog_files(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("a: [unclosed\n")
    listing = tmp_path / "list.yml"
    listing.write_text("- debian:12\n")
    for path, fragment in ((tmp_path / "missing.yml", "cannot read catalog_file"),
                           (broken, "is not valid YAML/JSON"), (listing, "must hold a mapping")):
        with pytest.raises(InvalidInput) as failure:
            catalog.resolve("debian:12", catalog_file=str(path))
        assert fragment in failure.value.msg and str(path) in failure.value.msg
