"""Placements per second by 4 controllers at once, against plain etcd puts per second, in one run.

Starts its own etcd (tests/harness EtcdCluster, temporary data dir), registers 3 host records (h1, h2, h3)
and lets 4 controller processes, started together behind a barrier, place their share of N instances of
mixed sizes (placement only: no domain is created), each through its own Store and one ``Placements`` (as a
module run holds one per batch). Then the same 4 processes' worth of plain etcd3gw ``put``s of fresh keys, in
the same round; the two kinds alternate which goes first from round to round.

After each round it checks from etcd: no host holds more than capacity x allocation ratio in any resource,
every placement record is in exactly its host's ledger with the same amounts, every ledger entry has its
placement record, the ledger totals equal the placement records, and every instance refused with NoCapacity
really fits on no host. Any failed check makes the exit status non-zero.

    .venv/bin/python bench/placement.py            # full: 200 instances, median of 5 rounds
    .venv/bin/python bench/placement.py --quick    # 40 instances, 1 round; run by test_placement_bench.py
    .venv/bin/python bench/placement.py --json     # one JSON object on stdout
    .venv/bin/python bench/placement.py --disk     # etcd data on disk (default tmpfs: fsync noise hides the ratio)
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from harness.etcd import EtcdCluster  # noqa: E402

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (  # noqa: E402
    ATTEMPTS,
    RESOURCES,
    NoCapacity,
    Placements,
    demand_of,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import parse_endpoint  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store  # noqa: E402

PREFIX = "/smallcloud-bench/placement"
HOSTS = ("h1", "h2", "h3")
CONTROLLERS = 4
SEED = 20240607
# What the host module records on a lab host of this machine (each lab host sees the whole machine): MemTotal
# in MiB and the size of the root file system. The vCPUs are sized from the demand instead (see host_records).
MEMORY_MB, DISK_GB = 24105, 252
# The cloud-wide default ratios (placement.DEFAULT_RATIOS), restated so the check does not trust the code it checks.
RATIOS = {"vcpus": 4.0, "memory_mb": 1.0, "disk_gb": 1.0}
CPU_FILL = 0.85  # allocatable vCPUs of all hosts / vCPUs asked for by all instances: CPU is the limit that bites


def workload(count, seed=SEED):
    """``[(name, demand)]``: 1-2 vCPUs, 256-512 MiB, 0-5 GiB of disk (in bytes, so rounding up is exercised)."""
    rng = random.Random(seed)
    return [("vm-%03d" % index, demand_of(rng.choice((1, 1, 2)), rng.choice((256, 384, 512)),
                                          rng.randint(0, 5 * 2 ** 30)))
            for index in range(count)]


def host_records(demands):
    """``{host: record}``: lab-host memory and disk, and vCPUs so that x4 they hold CPU_FILL of the demand."""
    asked = sum(demand["vcpus"] for _name, demand in demands)
    vcpus = max(1, round(CPU_FILL * asked / (len(HOSTS) * RATIOS["vcpus"])))
    return {host: {"name": host, "hostname": host, "state": "active", "allocation_ratios": {},
                   "capacity": {"vcpus": vcpus, "memory_mb": MEMORY_MB, "disk_gb": DISK_GB}} for host in HOSTS}


class CountingPlacements(Placements):
    """Placements that counts its transactions lost to another controller (each re-reads what it compared)."""

    lost = 0

    def _reserve(self, host, entries):
        won = super()._reserve(host, entries)
        self.lost += not won
        return won


def _store(endpoint, prefix):
    return Store.from_params({"etcd_endpoints": [endpoint], "etcd_prefix": prefix})


def _controller(job, barrier, queue):
    """One controller: place ``share`` through one Placements; its span and what became of each instance."""
    endpoint, prefix, worker, share, batch = job
    try:
        store = _store(endpoint, prefix)
        store.status()  # the connection is opened outside the timing; the first read of the view is inside
        placements = CountingPlacements(store)
        placed, refused, gave_up = {}, [], []
        barrier.wait()
        start = time.monotonic()
        most_lost = 0
        for first in range(0, len(share), batch):
            chunk = share[first:first + batch]
            lost = placements.lost
            try:
                # One batch, as one placement module call places its instances (one txn per host).
                answers = placements.place_all([(name, demand, None, None) for name, demand in chunk])
                placed.update({name: (host, new) for name, (host, _reason, new) in answers.items()})
            except NoCapacity:
                # Something of the batch fits nowhere any more: the rest one by one, to count what is refused.
                for name, demand in chunk:
                    try:
                        host, _reason, new = placements.place(name, demand)
                    except NoCapacity:
                        refused.append(name)
                    except Conflict:
                        gave_up.append(name)
                    else:
                        placed[name] = (host, new)
            except Conflict:
                gave_up.extend(name for name, _demand in chunk)
            finally:
                most_lost = max(most_lost, placements.lost - lost)
        end = time.monotonic()
        queue.put({"worker": worker, "start": start, "end": end, "placed": placed, "refused": refused,
                   "gave_up": gave_up, "lost": placements.lost, "most_lost": most_lost})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        barrier.abort()
        queue.put({"worker": worker, "error": traceback.format_exc()})


def _putter(job, barrier, queue):
    """One baseline client: ``count`` plain etcd3gw puts of fresh keys (as bench/etcd_alloc.py's baseline)."""
    endpoint, prefix, worker, count = job
    try:
        from etcd3gw.client import Etcd3Client

        parsed = parse_endpoint(endpoint)
        client = Etcd3Client(host=parsed.host, port=parsed.port, api_path="/v3/")
        client.put("%s/puts/%d-warm" % (prefix, worker), '{"owner":"x"}')  # warm the connection up
        barrier.wait()
        start = time.monotonic()
        for index in range(count):
            client.put("%s/puts/%d-%d" % (prefix, worker, index), '{"owner":"x"}')
        queue.put({"worker": worker, "start": start, "end": time.monotonic()})
    except BaseException:  # noqa: BLE001
        barrier.abort()
        queue.put({"worker": worker, "error": traceback.format_exc()})


def _together(target, jobs):
    """Run ``target(job, barrier, queue)`` in one process per job, released at once; their answers."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(jobs), timeout=120)
    queue = context.Queue()
    processes = [context.Process(target=target, args=(job, barrier, queue)) for job in jobs]
    for process in processes:
        process.start()
    try:
        answers = [queue.get(timeout=900) for _job in jobs]
    finally:
        for process in processes:
            process.join(timeout=30)
    errors = [answer["error"] for answer in answers if "error" in answer]
    if errors:
        raise RuntimeError("a bench process failed:\n" + "\n".join(errors))
    return sorted(answers, key=lambda answer: answer["worker"])


def _elapsed(answers):
    return max(answer["end"] for answer in answers) - min(answer["start"] for answer in answers)


def measure_placements(endpoint, prefix, demands, batch):
    """The controllers' answers and the elapsed time, instance i going to controller i % CONTROLLERS."""
    jobs = [(endpoint, prefix, worker, demands[worker::CONTROLLERS], batch) for worker in range(CONTROLLERS)]
    answers = _together(_controller, jobs)
    return answers, _elapsed(answers)


def measure_puts(endpoint, prefix, count):
    """Plain puts per second of CONTROLLERS processes doing ``count`` puts between them."""
    jobs = [(endpoint, prefix, worker, len(range(worker, count, CONTROLLERS))) for worker in range(CONTROLLERS)]
    return count / _elapsed(_together(_putter, jobs))


def _limits(record):
    capacity = record.get("capacity") or {}
    return {resource: capacity.get(resource, 0) * RATIOS[resource] for resource in RESOURCES}


def _total(entries):
    entries = list(entries)
    return {resource: sum(entry.get(resource) or 0 for entry in entries) for resource in RESOURCES}


def _entries(ledgers, host):
    return (ledgers.get(host) or {}).get("instances") or {}


def check_hosts(hosts, ledgers, records_):
    """Per host: nothing over capacity x ratio, ledger entries = placement records; ``(problems, overbooked)``."""
    problems, overbooked = [], set()
    for host, record in hosts.items():
        entries = _entries(ledgers, host)
        reserved = _total(entries.values())
        recorded = _total(placement for placement in records_.values() if placement.get("host") == host)
        limits = _limits(record)
        for resource in RESOURCES:
            if max(reserved[resource], recorded[resource]) > limits[resource]:
                overbooked.add(host)
                problems.append("host %s is overbooked in %s: ledger %s, placement records %s, limit %s"
                                % (host, resource, reserved[resource], recorded[resource], limits[resource]))
        if reserved != recorded:
            problems.append("host %s: ledger totals %s, its placement records %s" % (host, reserved, recorded))
        for name, entry in entries.items():
            placement = records_.get(name)
            if placement is None or placement.get("host") != host:
                problems.append("ledger of %s holds %s, whose placement record is %r" % (host, name, placement))
            elif any(entry.get(resource) != placement.get(resource) for resource in RESOURCES):
                problems.append("ledger of %s: %s is %s, its placement record %s" % (host, name, entry, placement))
    problems.extend("a ledger for %s, which is no registered host" % host for host in set(ledgers) - set(hosts))
    return problems, sorted(overbooked)


def check_records(wanted, ledgers, records_, placed):
    """Per placement record: in exactly its host's ledger, the demand asked, where the controller was told."""
    problems = []
    for name, placement in records_.items():
        host = placement.get("host")
        holders = [other for other in ledgers if name in _entries(ledgers, other)]
        if holders != [host]:
            problems.append("instance %s is placed on %s but in the ledgers of %s" % (name, host, holders))
        if name not in wanted or any(placement.get(key) != wanted[name][key] for key in RESOURCES):
            problems.append("placement record %s = %s, the demand %s" % (name, placement, wanted.get(name)))
        if placed.get(name) != host:
            problems.append("instance %s: the controller was told %s, etcd says %s" % (name, placed.get(name), host))
    problems.extend("instance %s was placed on %s but has no placement record" % (name, placed[name])
                    for name in set(placed) - set(records_))
    return problems


def verify(store, hosts, demands, answers):
    """What etcd holds after the controllers, checked; ``(problems, overbooked hosts, fill)``: fill is the share of
    all hosts' limits reserved, per resource."""
    ledgers = store.list("placement/hosts")
    records_ = store.list("placement/instances")
    wanted = dict(demands)
    placed = {name: host for answer in answers for name, (host, _new) in answer["placed"].items()}
    refused = [name for answer in answers for name in answer["refused"]]
    gave_up = sorted(name for answer in answers for name in answer["gave_up"])
    problems, overbooked = check_hosts(hosts, ledgers, records_)
    problems += check_records(wanted, ledgers, records_, placed)
    if len(placed) + len(refused) + len(gave_up) != len(demands):
        problems.append("%d placed + %d refused + %d given up != %d instances"
                        % (len(placed), len(refused), len(gave_up), len(demands)))
    if gave_up:
        problems.append("%d instance(s) lost %d races in a row and were given up (Conflict): %s"
                        % (len(gave_up), ATTEMPTS, ", ".join(gave_up)))
    # Nothing is ever released here, so an instance refused from any view must fit on no host at the end either.
    free = {}
    for host, record in hosts.items():
        limits, reserved = _limits(record), _total(_entries(ledgers, host).values())
        free[host] = {resource: limits[resource] - reserved[resource] for resource in RESOURCES}
    for name in refused:
        fits = [host for host in hosts if all(free[host][key] >= wanted[name][key] for key in RESOURCES)]
        if fits:
            problems.append("instance %s (%s) was refused with NoCapacity but fits on %s" % (name, wanted[name], fits))
    limits = {resource: sum(_limits(record)[resource] for record in hosts.values()) for resource in RESOURCES}
    fill = {resource: round(1 - sum(free[host][resource] for host in hosts) / limits[resource], 3)
            for resource in RESOURCES}
    return problems, overbooked, fill


def scratch_dir(on_disk):
    """A temporary directory for etcd's data: tmpfs unless ``on_disk``, so fsync noise does not drown the ratio."""
    if not on_disk and os.access("/dev/shm", os.W_OK):
        return tempfile.mkdtemp(prefix="etcd-bench-", dir="/dev/shm")
    return tempfile.mkdtemp(prefix="etcd-bench-")


def one_round(endpoint, number, demands, hosts, batch):
    """Placements and baseline puts on a fresh prefix, the order alternating by round; the round's figures."""
    prefix = "%s/r%d" % (PREFIX, number)
    store = _store(endpoint, prefix)
    for host, record in hosts.items():
        store.put("hosts/%s" % host, record)
    order = ("placement", "baseline") if number % 2 == 0 else ("baseline", "placement")
    for kind in order:
        if kind == "baseline":
            puts_per_s = measure_puts(endpoint, prefix, len(demands))
        else:
            answers, elapsed = measure_placements(endpoint, prefix, demands, batch)
    problems, overbooked, fill = verify(store, hosts, demands, answers)
    placed = sum(len(answer["placed"]) for answer in answers)
    return {
        "round": number + 1,
        "first": order[0],
        "placements_per_s": round(placed / elapsed, 1),
        "puts_per_s": round(puts_per_s, 1),
        "ratio": round(placed / elapsed / puts_per_s, 3),
        "placed": placed,
        "no_capacity": sum(len(answer["refused"]) for answer in answers),
        "gave_up": sum(len(answer["gave_up"]) for answer in answers),
        "lost_races": sum(answer["lost"] for answer in answers),
        "most_lost_by_one": max(answer["most_lost"] for answer in answers),
        "per_host": {host: sum(1 for answer in answers for where, _new in answer["placed"].values() if where == host)
                     for host in hosts},
        "fill": fill,
        "overbooked_hosts": len(overbooked),
        "problems": problems,
    }


def run(quick, on_disk=False, instances=None, rounds=None, batch=1):
    """Every round against one fresh etcd; a dict of the rounds and their medians."""
    count = instances or (40 if quick else 200)
    rounds = rounds or (1 if quick else 5)
    demands = workload(count)
    hosts = host_records(demands)
    workdir = scratch_dir(on_disk)
    cluster = EtcdCluster(workdir, size=1)
    try:
        endpoint = cluster.endpoints[0]
        root = _store(endpoint, PREFIX)
        results = {"quick": quick, "instances": count, "controllers": CONTROLLERS, "rounds": rounds, "batch": batch,
                   "etcd": root.status()["version"], "data_dir": workdir,
                   "host_capacity": hosts[HOSTS[0]]["capacity"], "ratios": RATIOS,
                   "asked": {resource: sum(demand[resource] for _name, demand in demands) for resource in RESOURCES},
                   "runs": []}
        for number in range(rounds):
            results["runs"].append(one_round(endpoint, number, demands, hosts, batch))
            root.delete_prefix("r%d" % number)
        runs = results["runs"]
        for field in ("placements_per_s", "puts_per_s", "ratio", "placed", "no_capacity", "lost_races"):
            results[field] = statistics.median(run_[field] for run_ in runs)
        results["overbooked_hosts"] = sum(run_["overbooked_hosts"] for run_ in runs)
        results["gave_up"] = sum(run_["gave_up"] for run_ in runs)
        results["problems"] = ["round %d: %s" % (run_["round"], problem)
                               for run_ in runs for problem in run_["problems"]]
        results["keys_left"] = len(root.keys(""))
        return results
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(results):
    """The results as a small table, then the problems found (if any)."""
    kind = "quick" if results["quick"] else "full"
    capacity = results["host_capacity"]
    lines = [
        "etcd %s (data in %s), %s run: %d instances, %d controllers placing batches of %d, 3 hosts of %d vCPUs "
        "(x%g), %d MiB, %d GiB"
        % (results["etcd"], results["data_dir"], kind, results["instances"], results["controllers"], results["batch"],
           capacity["vcpus"], RATIOS["vcpus"], capacity["memory_mb"], capacity["disk_gb"]),
        "asked: %(vcpus)d vCPUs, %(memory_mb)d MiB, %(disk_gb)d GiB" % results["asked"],
        "%-6s %-9s %13s %9s %7s %7s %11s %10s %9s %8s %-17s %s"
        % ("round", "first", "placements/s", "puts/s", "ratio", "placed", "NoCapacity", "lost races", "most lost",
           "gave up", "fill cpu/mem/disk", "overbooked"),
    ]
    for run_ in results["runs"]:
        fill = "/".join("%d%%" % round(100 * run_["fill"][resource]) for resource in RESOURCES)
        lines.append("%-6d %-9s %13.1f %9.1f %7.3f %7d %11d %10d %9d %8d %-17s %d"
                     % (run_["round"], run_["first"], run_["placements_per_s"], run_["puts_per_s"], run_["ratio"],
                        run_["placed"], run_["no_capacity"], run_["lost_races"], run_["most_lost_by_one"],
                        run_["gave_up"], fill, run_["overbooked_hosts"]))
    lines.append("%-6s %-9s %13.1f %9.1f %7.3f %7g %11g %10g"
                 % ("median", "", results["placements_per_s"], results["puts_per_s"], results["ratio"],
                    results["placed"], results["no_capacity"], results["lost_races"]))
    lines.append("checks: %s" % ("all passed" if not results["problems"] else "%d FAILED" % len(results["problems"])))
    lines.extend("  " + problem for problem in results["problems"])
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 instances, 1 round: seconds, for tests")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--disk", action="store_true", help="etcd data on disk instead of tmpfs (includes fsync)")
    parser.add_argument("--instances", type=int, help="instances per round (default 200; 40 with --quick)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; 1 with --quick)")
    parser.add_argument("--batch", type=int, default=1,
                        help="instances per placement call of a controller (default 1; a module call places its "
                             "whole batch, one transaction per host)")
    options = parser.parse_args()
    results = run(options.quick, on_disk=options.disk, instances=options.instances, rounds=options.rounds,
                  batch=options.batch)
    print(json.dumps(results) if options.json else report(results))
    return 1 if results["problems"] or results["overbooked_hosts"] or results["keys_left"] else 0


if __name__ == "__main__":
    sys.exit(main())
