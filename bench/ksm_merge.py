"""How much memory KSM merges in a fixed window under the kernel's defaults and under each preset.

Every configuration gets the same workload: WORKERS processes that each map MIB MiB of anonymous
memory marked MADV_MERGEABLE (as QEMU marks guest RAM), where page i holds the same bytes in every
worker, like guests booted from one image. Before each configuration every merged page is split
again (run=unmerge), the workers start fresh, the scanner is set with smallcloud.kvm's own KSM code
(module_utils/host/ksm.py, what the ksm module runs) and left to work for WINDOW seconds. Reported per
configuration: memory merged (the workers' /proc/PID/ksm_merging_pages), memory saved, the ratio of
merged memory against the kernel's defaults measured in the same run, and the CPU time ksmd used
(/proc/<ksmd>/stat). Every KSM setting is put back at the end.

    sudo .venv/bin/python bench/ksm_merge.py                 # 60 s per configuration
    sudo .venv/bin/python bench/ksm_merge.py --quick --json  # a few seconds: proves the bench works
"""

import argparse
import fcntl
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from ansible_collections.smallcloud.kvm.plugins.module_utils.host import ksm, ksm_sysfs  # noqa: E402

LOCK = Path("/run/lock/smallcloud-ksm-tests.lock")  # shared with the KSM tests: one tuner at a time
BASELINE = "kernel_defaults"
RESTORED = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "merge_across_nodes",
            "use_zero_pages", "smart_scan")


def worker(pages):
    """Hold ``pages`` mergeable pages (page i identical in every worker) until stdin closes."""
    size = pages * mmap.PAGESIZE
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for index in range(pages):
        area[index * mmap.PAGESIZE:(index + 1) * mmap.PAGESIZE] = struct.pack("<Q", index + 1) * (mmap.PAGESIZE // 8)
    area.madvise(mmap.MADV_MERGEABLE)
    print("ready", flush=True)
    sys.stdin.read()


def start_workers(count, pages):
    """Start ``count`` workers and wait until each holds its pages."""
    processes = []
    for _index in range(count):
        process = subprocess.Popen([sys.executable, __file__, "--worker", str(pages)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        processes.append(process)
        if process.stdout.readline().strip() != "ready":
            stop_workers(processes)
            raise RuntimeError("a worker did not start")
    return processes


def stop_workers(processes):
    for process in processes:
        process.kill()
        process.wait()


def merged_pages(processes):
    """Pages of the workers that KSM has merged, summed."""
    return sum(int(Path("/proc/%d/ksm_merging_pages" % p.pid).read_text()) for p in processes)


def ksmd_cpu_seconds():
    """CPU time (user + system) ksmd has used since boot."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "ksmd":
                fields = (comm.parent / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    raise RuntimeError("no ksmd process: is KSM built into this kernel?")


def pace(preset):
    """Pages per second a preset lets ksmd scan."""
    return ksm_sysfs.PRESETS[preset]["pages_to_scan"] * 1000.0 / ksm_sysfs.PRESETS[preset]["sleep_millisecs"]


def apply(sysfs_root, **settings):
    """Set KSM with the collection's own code (what the ksm module does)."""
    return ksm.converge(dict(settings, sysfs_root=sysfs_root, persist=False))


def counter(sysfs_root, name):
    """A KSM counter, or None when this kernel lacks it."""
    return ksm_sysfs.read_all(sysfs_root).get(name)


def watch(processes, window, total):
    """Sleep through the window, sampling merged pages; return (merged, seconds to 50 %, seconds to 90 %)."""
    started, reached = time.monotonic(), {}
    while True:
        elapsed = time.monotonic() - started
        merged = merged_pages(processes)
        for share in (0.5, 0.9):
            if share not in reached and merged >= share * total:
                reached[share] = round(elapsed, 1)
        if elapsed >= window:
            return merged, reached.get(0.5), reached.get(0.9)
        time.sleep(min(0.5, window - elapsed))


def measure(name, args, page_size):
    """One configuration: fresh workers, scanner set, WINDOW seconds, figures."""
    apply(args.sysfs_root, run="unmerge")
    processes = start_workers(args.workers, args.pages)
    total = args.workers * args.pages
    try:
        scanned_before = counter(args.sysfs_root, "pages_scanned")
        apply(args.sysfs_root, preset=name, run="running")
        cpu_before, started = ksmd_cpu_seconds(), time.monotonic()
        merged, to_half, to_most = watch(processes, args.window, total)
        cpu = ksmd_cpu_seconds() - cpu_before
        elapsed = time.monotonic() - started
        scanned_after = counter(args.sysfs_root, "pages_scanned")
    finally:
        stop_workers(processes)
        apply(args.sysfs_root, run="stopped")
    scanned = None if scanned_before is None else scanned_after - scanned_before
    return {
        "config": name,
        "pages_to_scan": ksm_sysfs.PRESETS[name]["pages_to_scan"],
        "sleep_millisecs": ksm_sysfs.PRESETS[name]["sleep_millisecs"],
        "merged_bytes": merged * page_size,
        # Page i of every worker merges into one KSM page: each group of WORKERS keeps one.
        "saved_bytes": merged * page_size * (args.workers - 1) // args.workers,
        "merged_fraction": round(merged / float(total), 4),
        "seconds_to_50_percent": to_half,
        "seconds_to_90_percent": to_most,
        "scanned_pages_per_second": None if scanned is None else round(scanned / elapsed),
        "ksmd_cpu_seconds": round(cpu, 3),
        "ksmd_cpu_percent": round(100.0 * cpu / elapsed, 1),
    }


def run(args):
    """Every configuration in one run, then the ratios against the kernel's defaults."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    original = ksm_sysfs.settings_view(ksm_sysfs.read_all(args.sysfs_root))
    results = []
    try:
        for name in [BASELINE] + sorted((p for p in args.presets if p != BASELINE), key=pace):
            results.append(measure(name, args, page_size))
    finally:
        apply(args.sysfs_root, run="unmerge")
        apply(args.sysfs_root, **{k: v for k, v in original.items() if k in RESTORED})
    baseline = results[0]["merged_bytes"]
    for result in results:
        result["ratio_vs_kernel_defaults"] = round(result["merged_bytes"] / float(baseline), 2) if baseline else None
    return {"window_seconds": args.window, "workers": args.workers, "mib_per_worker": args.pages * page_size >> 20,
            "results": results}


def report(summary):
    """A table for people."""
    title = "KSM merge in %s s windows, %d workers x %d MiB of mergeable pages" % (
        summary["window_seconds"], summary["workers"], summary["mib_per_worker"])
    header = ("config", "merged MiB", "saved MiB", "merged", "ratio", "to 90 %", "scan pages/s", "ksmd CPU s",
              "ksmd CPU")
    row = "%-16s %10s %10s %7s %7s %8s %13s %11s %9s"
    lines = [title, row % header]
    for r in summary["results"]:
        lines.append(row % (
            r["config"], "%.1f" % (r["merged_bytes"] / 2.0 ** 20), "%.1f" % (r["saved_bytes"] / 2.0 ** 20),
            "%.0f%%" % (100 * r["merged_fraction"]), _maybe("%.2fx", r["ratio_vs_kernel_defaults"]),
            _maybe("%.1f s", r["seconds_to_90_percent"]), _maybe("%d", r["scanned_pages_per_second"]),
            "%.2f" % r["ksmd_cpu_seconds"], "%.1f%%" % r["ksmd_cpu_percent"]))
    if summary["results"][0]["merged_bytes"] == 0:
        lines.append("(kernel defaults merged nothing in the window, so there is no ratio: use a longer --window)")
    return "\n".join(lines)


def _maybe(fmt, value):
    return "-" if value is None else fmt % value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds each configuration runs (default 60)")
    parser.add_argument("--workers", type=int, default=4, help="processes holding mergeable pages (default 4)")
    parser.add_argument("--mib", type=int, default=128, help="MiB of mergeable pages per worker (default 128)")
    parser.add_argument("--presets", nargs="+", default=sorted(ksm_sysfs.PRESETS), choices=sorted(ksm_sysfs.PRESETS),
                        help="presets to measure besides the kernel defaults (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 s windows, 2 workers x 1 MiB: proves the bench works")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--sysfs-root", default="/sys", help="where sysfs is mounted (default /sys)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.workers, args.mib = 3.0, 2, 1
    if args.window <= 0 or args.workers < 2 or args.mib < 1:
        parser.error("--window must be > 0, --workers at least 2 and --mib at least 1")
    args.pages = (args.mib << 20) // mmap.PAGESIZE
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = run(args)
    print(json.dumps(summary, indent=2) if args.json else report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
