"""Allocations per second through the state store, against plain etcd puts per second, in one run.

Starts its own etcd (tests/harness EtcdCluster, temporary data dir), then measures with 1 and 8
parallel client processes:
  baseline   plain etcd3gw ``put`` of a fresh key (what a module would otherwise do)
  ip         Store.allocate_ip in a /16 (taken set read, free pick, create-if-absent txn)
  vni        Store.allocate_vni (random pick, create-if-absent txn)
and prints each rate with its ratio to the baseline of the same client count.

    .venv/bin/python bench/etcd_alloc.py            # full run
    .venv/bin/python bench/etcd_alloc.py --quick    # a few seconds; used by tests/integration/test_store_bench.py
    .venv/bin/python bench/etcd_alloc.py --json     # one JSON object on stdout
    .venv/bin/python bench/etcd_alloc.py --disk     # etcd data on disk (default tmpfs: fsync noise hides the ratio)
"""

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from harness.etcd import EtcdCluster  # noqa: E402

from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import parse_endpoint  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store  # noqa: E402

PREFIX = "/smallcloud-bench/v1"
KINDS = ("baseline", "ip", "vni")


def _operation(endpoint, kind, worker):
    """The function one client repeats: index -> one put or allocation."""
    store = Store.from_params({"etcd_endpoints": [endpoint], "etcd_prefix": PREFIX})
    if kind == "baseline":
        from etcd3gw.client import Etcd3Client

        parsed = parse_endpoint(endpoint)
        client = Etcd3Client(host=parsed.host, port=parsed.port, api_path="/v3/")

        def put(index):
            return client.put("%s/puts/%d-%d" % (PREFIX, worker, index), '{"owner":"x"}')

        return put

    def allocate(index):
        owner = "w%d-%d" % (worker, index)
        if kind == "ip":
            return store.allocate_ip("bench", "10.99.0.0/16", owner)
        return store.allocate_vni(owner)

    return allocate


def _work(endpoint, kind, worker, count):
    """One client process: ``count`` operations of ``kind``; (start, end) on the shared monotonic clock."""
    operation = _operation(endpoint, kind, worker)
    operation(-1)  # warm the connection up outside the timing
    start = time.monotonic()
    for index in range(count):
        operation(index)
    return start, time.monotonic()


def measure(endpoint, kind, clients, count):
    """Operations per second of ``clients`` processes doing ``count`` operations each."""
    jobs = [(endpoint, kind, worker, count) for worker in range(clients)]
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        spans = pool.starmap(_work, jobs)
    elapsed = max(end for _start, end in spans) - min(start for start, _end in spans)
    return clients * count / elapsed


def scratch_dir(on_disk):
    """A temporary directory for etcd's data: tmpfs unless ``on_disk``, so fsync noise does not drown the ratio."""
    if not on_disk and os.access("/dev/shm", os.W_OK):
        return tempfile.mkdtemp(prefix="etcd-bench-", dir="/dev/shm")
    return tempfile.mkdtemp(prefix="etcd-bench-")


def run(quick, on_disk=False):
    """Every measurement against a fresh etcd; a dict of median rates and their ratios.

    Kinds alternate within each round so that disk and CPU noise from other processes on a shared
    machine hits baseline and allocations alike; the median of the rounds is reported.
    """
    per_client = {1: 60, 8: 25} if quick else {1: 400, 8: 150}
    rounds = 1 if quick else 3
    workdir = scratch_dir(on_disk)
    cluster = EtcdCluster(workdir, size=1)
    try:
        endpoint = cluster.endpoints[0]
        store = Store.from_params({"etcd_endpoints": [endpoint], "etcd_prefix": PREFIX})
        results = {"quick": quick, "rounds": rounds, "etcd": store.status()["version"], "data_dir": workdir, "runs": []}
        for clients, count in sorted(per_client.items()):
            samples = {kind: [] for kind in KINDS}
            for _round in range(rounds):
                for kind in KINDS:
                    samples[kind].append(measure(endpoint, kind, clients, count))
                    for folder in ("puts", "ipam", "vni"):
                        store.delete_prefix(folder)
            rates = {kind: statistics.median(values) for kind, values in samples.items()}
            results["runs"].append(
                {
                    "clients": clients,
                    "ops_per_client": count,
                    "puts_per_s": round(rates["baseline"], 1),
                    "ip_allocs_per_s": round(rates["ip"], 1),
                    "vni_allocs_per_s": round(rates["vni"], 1),
                    "ip_ratio": round(rates["ip"] / rates["baseline"], 3),
                    "vni_ratio": round(rates["vni"] / rates["baseline"], 3),
                }
            )
        results["keys_left"] = len(store.keys(""))
        return results
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(results):
    """The results as a small table."""
    kind = "quick" if results["quick"] else "full"
    lines = [
        "etcd %s (data in %s), %s run, median of %d round(s)"
        % (results["etcd"], results["data_dir"], kind, results["rounds"])
    ]
    lines.append("%-8s %10s %14s %9s %15s %9s" % ("clients", "puts/s", "ip allocs/s", "ratio", "vni allocs/s", "ratio"))
    for run_ in results["runs"]:
        lines.append(
            "%-8d %10.1f %14.1f %9.3f %15.1f %9.3f"
            % (
                run_["clients"],
                run_["puts_per_s"],
                run_["ip_allocs_per_s"],
                run_["ip_ratio"],
                run_["vni_allocs_per_s"],
                run_["vni_ratio"],
            )
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--disk", action="store_true", help="etcd data on disk instead of tmpfs (includes fsync)")
    options = parser.parse_args()
    results = run(options.quick, on_disk=options.disk)
    print(json.dumps(results) if options.json else report(results))


if __name__ == "__main__":
    main()
