"""The ksm and ksm_info modules, driven through Ansible, against this machine's real /sys/kernel/mm/ksm.

Every test restores each original KSM value afterwards (``real_ksm``), and takes a lock so two runs
of these tests (or the bench) on one machine never tune KSM at the same time.
"""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from harness.ksm import KSM, ksm_locked_and_restored, read, write, writable_settings
from harness.ports import wait_for

pytestmark = pytest.mark.integration

# A process holding PAGES identical pages marked MADV_MERGEABLE (as QEMU marks guest RAM) until stdin
# closes; non-zero content, because empty pages merge differently (use_zero_pages).
WORKER = """
import mmap, sys
size = int(sys.argv[1]) * mmap.PAGESIZE
area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
area.write(b"smallcloud-ksm!!" * (size // 16))
area.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.read()
"""

if not KSM.is_dir():
    pytest.skip("this kernel has no KSM", allow_module_level=True)


@pytest.fixture
def real_ksm():
    """The real KSM directory, locked for this test and restored to every original value afterwards."""
    with ksm_locked_and_restored() as original:
        yield original
    assert writable_settings() == original


@pytest.fixture
def merge_workers():
    """Factory: ``start(n, pages)`` runs n processes holding identical MADV_MERGEABLE pages; all ended after."""
    processes = []

    def start(count=2, pages=2048):
        for _index in range(count):
            process = subprocess.Popen([sys.executable, "-c", WORKER, str(pages)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
            processes.append(process)
            assert process.stdout.readline().strip() == "ready"
        return processes

    yield start
    for process in processes:
        process.kill()
        process.wait(timeout=10)


def changed_pace(original):
    """A scanner pace different from the one set now."""
    return {"pages_to_scan": int(original["pages_to_scan"]) + 37,
            "sleep_millisecs": int(original["sleep_millisecs"]) + 3}


def test_check_apply_reapply_and_diff_with_persist(ansible, real_ksm, tmp_path):
    path = tmp_path / "tmpfiles.d" / "smallcloud-ksm.conf"
    args = dict(changed_pace(real_ksm), persist=True, persist_path=str(path))
    checked = ansible.run_module("ksm", args, check=True, diff=True)
    assert checked["changed"] is True and "failed" not in checked, checked.get("msg")
    assert read("pages_to_scan") == real_ksm["pages_to_scan"] and not path.exists()  # check mode wrote nothing
    assert checked["diff"]["before"]["pages_to_scan"] == int(real_ksm["pages_to_scan"])
    assert checked["diff"]["after"]["pages_to_scan"] == args["pages_to_scan"]
    assert checked["diff"]["before"]["persist_file"] is None
    line = "w /sys/kernel/mm/ksm/pages_to_scan - - - - %d" % args["pages_to_scan"]
    assert line in checked["diff"]["after"]["persist_file"]
    applied = ansible.run_module("ksm", args, diff=True)
    assert applied["changed"] is True
    assert read("pages_to_scan") == str(args["pages_to_scan"])
    assert read("sleep_millisecs") == str(args["sleep_millisecs"])
    assert applied["settings"]["pages_to_scan"] == args["pages_to_scan"] and line in path.read_text()
    again = ansible.run_module("ksm", args, diff=True)
    assert again["changed"] is False and again["actions"] == []


BAD_INPUT = [
    ({"pages_to_scan": -5}, "pages_to_scan=-5"),
    ({"sleep_millisecs": "soon"}, "soon"),
    ({"max_page_sharing": 1}, "max_page_sharing=1"),
    ({"preset": "turbo"}, "turbo"),
    ({"run": "fast"}, "fast"),
    ({"sysfs_root": "/nonexistent/sys"}, "this kernel has no KSM: CONFIG_KSM"),
]


def test_bad_input_fails_naming_the_value_and_changes_nothing(ansible, real_ksm):
    tasks = [{"name": "bad %d" % i, "smallcloud.kvm.ksm": dict({"run": "running"}, **args), "ignore_errors": True}
             for i, (args, _named) in enumerate(BAD_INPUT)]
    tasks.append({"name": "info without KSM", "smallcloud.kvm.ksm_info": {"sysfs_root": "/nonexistent/sys"}})
    results = ansible.run_tasks(tasks).results()
    assert len(results) == len(tasks)
    for (args, named), result in zip(BAD_INPUT, results):
        assert result.get("failed") is True and named in result["msg"], (args, result.get("msg"))
    assert results[-1]["ksm"]["available"] is False and "CONFIG_KSM" in results[-1]["ksm"]["reason"]
    assert writable_settings() == real_ksm


def merging_pages(process):
    """Pages of ``process`` that KSM has merged (/proc/PID/ksm_merging_pages, kernels 6.1+)."""
    return int(Path("/proc/%d/ksm_merging_pages" % process.pid).read_text())


def test_identical_mergeable_pages_merge_under_the_modules_settings(ansible, real_ksm, merge_workers):
    pages = 2048
    workers = merge_workers(2, pages)
    if real_ksm["run"] != "1":
        assert [merging_pages(w) for w in workers] == [0, 0]  # nothing merges while KSM is stopped
    result = ansible.run_module("ksm", {"run": "running", "preset": "aggressive"})
    assert result["changed"] is True and read("run") == "1"
    # Bounded poll, no wall time asserted. pages_sharing is global (other guests count too, and counts
    # of exited processes stay until ksmd rescans), so the per-process figure shows these pages merged.
    wait_for(lambda: all(merging_pages(w) >= pages * 0.9 for w in workers), 120, interval=0.5,
             what="the workers' pages merged")
    wait_for(lambda: int(read("pages_sharing")) >= 2 * pages * 0.9, 60, interval=0.5,
             what="pages_sharing to count the workers' pages")
    info = ansible.run_module("ksm_info", {}, check=True)["ksm"]
    assert set(info["counters"]) | set(info["settings"]) == {path.name for path in KSM.iterdir()}
    assert info["running"] is True and info["page_size"] == 4096
    assert info["memory_saved_bytes"] >= 2 * pages * 0.9 * info["page_size"]
    assert info["sharing_ratio"] > 1


def test_merge_across_nodes_changes_while_pages_are_merged(ansible, real_ksm, merge_workers):
    (worker,) = merge_workers(1, 1024)
    ansible.run_module("ksm", {"run": "running", "preset": "aggressive"})
    wait_for(lambda: merging_pages(worker) > 0, 120, interval=0.5, what="pages merged")
    flipped = 0 if real_ksm["merge_across_nodes"] == "1" else 1
    with pytest.raises(OSError) as refused:  # what the kernel does without the module's unmerge step
        write("merge_across_nodes", flipped)
    assert refused.value.errno == errno.EBUSY
    result = ansible.run_module("ksm", {"merge_across_nodes": bool(flipped)})
    assert result["changed"] is True, result.get("msg")
    assert result["actions"][0].startswith("unmerge every merged page")
    assert read("merge_across_nodes") == str(flipped) and read("run") == "1"  # run restored
    assert ansible.run_module("ksm", {"merge_across_nodes": bool(flipped)})["changed"] is False
