"""The image_cache module: listing, integrity checks and pruning, never of images an instance uses.

The cache is filled in-process from file:// URLs (quick); the module runs through Ansible.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest
from harness.module_stub import ModuleStub

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_cache, images
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

pytestmark = pytest.mark.integration

DAY = 86400


def fetch(cache, source):
    """Cache ``source`` (a local file) the way the image module does; return its result."""
    return images.run(ModuleStub(images.MODULE_SPEC, url=source.as_uri(), cache_dir=str(cache), retries=0,
                                 timeout=10))


def age(result, days):
    """Pretend the entry was last used ``days`` ago."""
    meta_path = Path(result["path"] + ".json")
    meta = json.loads(meta_path.read_text())
    meta["last_used"] = int(time.time() - days * DAY)
    meta_path.write_text(json.dumps(meta))


@pytest.fixture
def cache(tmp_path):
    """Four cached images: fresh, old, old but backing an instance disk, and corrupt."""
    sources = tmp_path / "sources"
    sources.mkdir()
    entries = {}
    for name in ("fresh", "old", "in-use", "corrupt"):
        source = sources / (name + ".raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(source), "1M"], check=True)
        with open(source, "r+b") as handle:
            handle.write(name.encode() * 1000)
        entries[name] = fetch(tmp_path / "cache", source)
    age(entries["old"], 40)
    age(entries["in-use"], 40)
    instances = tmp_path / "instances" / "vm1"
    instances.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", entries["in-use"]["path"], "-F", "qcow2",
                    str(instances / "root.qcow2")], check=True)
    with open(entries["corrupt"]["path"], "r+b") as handle:  # same size, different bytes
        handle.seek(70000)
        handle.write(b"bitrot")
    return {"dir": tmp_path / "cache", "instances": tmp_path / "instances", "entries": entries}


def keys(result, field):
    return sorted(item["key"] for item in result[field])


def test_lists_entries_with_sizes_and_total(ansible, cache):
    args = {"cache_dir": str(cache["dir"]), "instance_dirs": [str(cache["instances"])]}
    listed = ansible.run_module("image_cache", args)
    assert listed["changed"] is False and listed["count"] == 4, listed
    assert listed["total_size"] == sum(entry["size"] for entry in listed["entries"]) > 0
    by_key = {entry["key"]: entry for entry in listed["entries"]}
    in_use = by_key[cache["entries"]["in-use"]["key"]]
    assert in_use["in_use_by"] == [str(cache["instances"] / "vm1" / "root.qcow2")]
    assert by_key[cache["entries"]["old"]["key"]]["age"] >= 40 * DAY
    assert all(entry["status"] == "ok" for entry in listed["entries"])  # without verify, bitrot is invisible


def test_verify_prune_check_mode_then_apply_then_idempotent(ansible, cache):
    args = {"cache_dir": str(cache["dir"]), "instance_dirs": [str(cache["instances"])], "verify": True,
            "remove_corrupt": True, "max_age": "30d"}
    entries = cache["entries"]
    doomed = sorted([entries["old"]["key"], entries["corrupt"]["key"]])

    checked = ansible.run_module("image_cache", args, check=True, diff=True)
    assert checked["changed"] is True, checked
    assert checked["corrupt"] == [entries["corrupt"]["key"]]
    assert keys(checked, "removed") == doomed
    assert keys(checked, "kept") == [entries["in-use"]["key"]]
    assert len(checked["diff"]["before"]["entries"]) == 4 and len(checked["diff"]["after"]["entries"]) == 2
    assert all(Path(entry["path"]).exists() for entry in entries.values())  # check mode removed nothing

    applied = ansible.run_module("image_cache", args, diff=True)
    assert applied["changed"] is True and keys(applied, "removed") == doomed
    remaining = sorted(path.name for path in cache["dir"].iterdir())
    kept = [Path(entries[name]["path"]).name for name in ("fresh", "in-use")]
    expected = sorted(name + suffix for name in kept for suffix in ("", ".json"))
    assert remaining == expected

    again = ansible.run_module("image_cache", args)
    assert again["changed"] is False and again["removed"] == [] and again["count"] == 2
    assert again["corrupt"] == []


def test_explicit_removal_and_bad_names(ansible, cache):
    fresh = cache["entries"]["fresh"]
    base = {"cache_dir": str(cache["dir"]), "instance_dirs": [str(cache["instances"])]}
    removed = ansible.run_module("image_cache", dict(base, remove=[fresh["key"]]))
    assert removed["changed"] is True and not Path(fresh["path"]).exists()

    escaping = ansible.run_module("image_cache", dict(base, remove=["../../etc/passwd"]))
    assert escaping["failed"] is True and "'../../etc/passwd' is not a cache entry key" in escaping["msg"]

    in_use = ansible.run_module("image_cache", dict(base, remove=[cache["entries"]["in-use"]["key"]]))
    assert in_use["failed"] is True and "root.qcow2" in in_use["msg"]
    assert Path(cache["entries"]["in-use"]["path"]).exists()

    bad_age = ansible.run_module("image_cache", dict(base, max_age="a fortnight"))
    assert bad_age["failed"] is True and "'a fortnight' is not a duration" in bad_age["msg"]


def test_missing_pieces_are_corrupt_without_verify(cache):
    entries = cache["entries"]
    Path(entries["fresh"]["path"]).unlink()  # metadata without image
    Path(entries["old"]["path"] + ".json").write_text("{not json")
    module = ModuleStub(image_cache.MODULE_SPEC, cache_dir=str(cache["dir"]), verify=False, remove_corrupt=True,
                        max_age=None, instance_dirs=[str(cache["instances"])], remove=[])
    result = image_cache.run(module)
    problems = {entry["key"]: entry["problem"] for entry in result["entries"] if entry["status"] == "corrupt"}
    assert "is missing" in problems[entries["fresh"]["key"]]
    assert "missing or unreadable" in problems[entries["old"]["key"]]
    assert keys(result, "removed") == sorted([entries["fresh"]["key"], entries["old"]["key"]])
    assert not list(cache["dir"].glob(entries["old"]["key"] + "*"))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30d", 30 * DAY), ("12h", 43200), ("90m", 5400), ("45", 45), ("2w", 14 * DAY), (None, None)],
)
def test_parse_age(value, seconds):
    assert image_cache.parse_age(value) == seconds


@pytest.mark.parametrize("value", ["-1d", "1y", "soon", "1.5h"])
def test_parse_age_rejects(value):
    with pytest.raises(InvalidInput):
        image_cache.parse_age(value)
