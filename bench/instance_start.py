"""Instance start from a warm image cache, and a no-change batch re-run, each against its baseline, in one run.

1. start: from a cached image to "domain running"
     module     the instance module's code path in-process (instances.run: etcd listing, lock, MAC and
                IP allocation, qemu-img overlay, seed ISO, define, start, record), without Ansible's start-up
     baseline   ``qemu-img create -f qcow2 -F qcow2 -b BASE`` + ``virsh define`` + ``virsh start``
   alternating, median of each; ratio = module / baseline (goal <= 1.3).
2. rerun: N defined instances, nothing to change, both through ansible-playbook
     batch      one smallcloud.kvm.instance task with ``instances:`` (N entries)
     loop       community.libvirt.virt in a loop over the N names (what a playbook without batching does)
     floor      ansible.builtin.ping: Ansible's per-task floor (AnsiballZ, Python, ansible.module_utils.basic)
   one line per round; ratio = loop / batch (goal >= 10); also the batch's in-process time and what the
   batch task's time consists of (floor task, module start-up beyond the floor, in-process work).

Starts its own etcd (tests/harness), makes a scratch dir in /var/tmp, a bridge and a network record;
removes all of it (domains, files, bridge, etcd) afterwards. Needs root; uses the libvirtd that answers on
qemu:///system, or starts virtlogd + libvirtd (tests/harness/libvirtd.py) and stops them at the end.

    .venv/bin/python bench/instance_start.py            # 5 start rounds, 30 instances, 3 re-run rounds
    .venv/bin/python bench/instance_start.py --quick    # 1 round, 3 instances (test_instance_bench.py)
    .venv/bin/python bench/instance_start.py --rerun-only --rerun-rounds 3   # only the re-run comparison
    .venv/bin/python bench/instance_start.py --json
"""

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

import libvirt  # noqa: E402
import module_startup  # noqa: E402 - bench/module_startup.py, beside this file
from harness import ansible as ansible_harness  # noqa: E402
from harness.etcd import EtcdCluster  # noqa: E402
from harness.libvirtd import Libvirtd  # noqa: E402
from harness.module_stub import ModuleStub  # noqa: E402

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import etcd_gateway  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml  # noqa: E402
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import instances  # noqa: E402

URI = "qemu:///system"
PREFIX = "/smallcloud-bench/v1"
CIDR = "10.215.0.0/16"


def virsh(*args, check=True):
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, check=check, timeout=300)


class Bench:
    """Scratch dir, etcd, bridge and network record; cleanup() removes everything."""

    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="sct-bench-", dir="/var/tmp")
        os.chmod(self.work, 0o755)
        self.tag = "scb-%s" % uuid.uuid4().hex[:6]
        self.etcd = EtcdCluster(Path(self.work) / "etcd", size=1)
        self.base = os.path.join(self.work, "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.base, "64M"], check=True)
        # The baseline's domain gets the same devices, its seed made once, outside the timed part.
        self.seed = os.path.join(self.work, "baseline-seed.iso")
        seed_dir = os.path.join(self.work, "baseline-seed")
        os.makedirs(seed_dir)
        with open(os.path.join(seed_dir, "meta-data"), "w") as handle:
            handle.write("instance-id: baseline\n")
        subprocess.run(["genisoimage", "-quiet", "-o", self.seed, "-V", "cidata", "-J", "-r", seed_dir], check=True)
        self.vni = random.randint(0xF00000, 0xFFFFFF)
        self.bridge = "br-%x" % self.vni
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        store = Store.from_params(self.etcd_args())
        store.put("networks/lan", {"name": "lan", "cidr": CIDR, "vni": self.vni, "mtu": 1450, "dhcp": True,
                                   "dns_servers": [], "nat": False, "vteps": [], "gateway_vtep": None})

    def etcd_args(self):
        return {"etcd_endpoints": self.etcd.endpoints, "etcd_prefix": PREFIX}

    def module(self, **extra):
        """The instance module's stand-in: the argument spec's defaults, the bench's paths, ``extra``."""
        params = dict(self.etcd_args(), image=self.base, memory=64, networks=["lan"], shutdown_timeout=0,
                      instances_dir=os.path.join(self.work, "instances"),
                      cache_dir=os.path.join(self.work, "cache"))
        params.update(extra)
        return ModuleStub(instances.MODULE_SPEC, **params)

    def module_args(self, **extra):
        """The same settings as task arguments."""
        args = dict(self.etcd_args(), image=self.base, memory=64, networks=["lan"], shutdown_timeout=0,
                    instances_dir=os.path.join(self.work, "instances"),
                    cache_dir=os.path.join(self.work, "cache"))
        args.update(extra)
        return args

    def cleanup(self):
        for name in virsh("list", "--all", "--name", check=False).stdout.split():
            if name.startswith(self.tag):
                virsh("destroy", name, check=False)
                virsh("undefine", name, "--managed-save", "--snapshots-metadata", "--nvram", check=False)
        subprocess.run(["ip", "link", "del", self.bridge], check=False)
        self.etcd.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def module_start(bench, name):
    """Seconds for the module's code path to bring ``name`` from nothing to running."""
    started = time.perf_counter()
    result = instances.run(bench.module(name=name))
    elapsed = time.perf_counter() - started
    assert result["state"] == "running" and result["changed"], result
    instances.run(bench.module(name=name, state="absent"))
    return elapsed


def baseline_start(bench, name):
    """Seconds for qemu-img create -b + virsh define + virsh start of the same domain (no etcd, seed premade)."""
    directory = os.path.join(bench.work, "baseline", name)
    os.makedirs(directory)
    root = os.path.join(directory, "root.qcow2")
    xml_path = os.path.join(directory, "domain.xml")
    with open(xml_path, "w") as handle:
        handle.write(dom_xml.build_xml({
            "name": name, "virt_type": "qemu", "cpus": 1, "memory": 64,
            "disks": [{"device": "disk", "target": "vda", "bus": "virtio", "path": root, "format": "qcow2"},
                      {"device": "cdrom", "target": "sda", "bus": "scsi", "path": bench.seed, "format": "raw"}],
            "nics": [{"mac": "52:54:00:%02x:%02x:%02x" % tuple(random.sample(range(256), 3)),
                      "bridge": bench.bridge}],
            "console_log": os.path.join(directory, "console.log")}))
    started = time.perf_counter()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", bench.base, root], check=True)
    virsh("define", xml_path)
    virsh("start", name)
    elapsed = time.perf_counter() - started
    virsh("destroy", name)
    virsh("undefine", name)
    shutil.rmtree(directory)
    return elapsed


def measure_start(bench, rounds):
    """Alternating module/baseline starts; medians and ratio."""
    # Warm the cache (and libvirt) first: the bench is about a warm start.
    module_start(bench, "%s-warm" % bench.tag)
    baseline_start(bench, "%s-warmb" % bench.tag)
    module_times, baseline_times = [], []
    for index in range(rounds):
        module_times.append(module_start(bench, "%s-m%d" % (bench.tag, index)))
        baseline_times.append(baseline_start(bench, "%s-b%d" % (bench.tag, index)))
    module, baseline = statistics.median(module_times), statistics.median(baseline_times)
    return {"rounds": rounds, "module_s": round(module, 3), "baseline_s": round(baseline, 3),
            "ratio": round(module / baseline, 2), "module_all": [round(t, 3) for t in module_times],
            "baseline_all": [round(t, 3) for t in baseline_times]}


def iso_seconds(stamp):
    """Seconds since the epoch of the callback's ISO-8601 UTC stamp."""
    moment = datetime.datetime.strptime(stamp.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def playbook_seconds(task):
    """(task seconds, playbook wall seconds, run) of one ansible-playbook run of ``task`` on localhost."""
    started = time.perf_counter()
    run = ansible_harness.run_tasks([task])
    elapsed = time.perf_counter() - started
    if run.rc != 0 or run.failed_count():
        raise RuntimeError("playbook failed: %s\n%s" % (run.stdout[-3000:], run.stderr[-2000:]))
    duration = run.tasks[0]["task"]["duration"]
    return iso_seconds(duration["end"]) - iso_seconds(duration["start"]), elapsed, run


class Counted:
    """Counts etcd requests, commands and libvirt connections made inside the ``with`` block."""

    def __enter__(self):
        self.etcd = self.commands = self.connections = 0
        # libvirt.open on the libvirt module itself: whichever module_utils file opens the connection.
        self.saved = (etcd_gateway.EtcdGateway.call, commands.run, libvirt.open)
        call, run, connect = self.saved

        def counted_call(gateway, path, payload):
            self.etcd += 1
            return call(gateway, path, payload)

        def counted_run(*args, **kwargs):
            self.commands += 1
            return run(*args, **kwargs)

        def counted_open(*args):
            self.connections += 1
            return connect(*args)

        etcd_gateway.EtcdGateway.call, commands.run, libvirt.open = counted_call, counted_run, counted_open
        return self

    def __exit__(self, *exc):
        etcd_gateway.EtcdGateway.call, commands.run, libvirt.open = self.saved


def measure_rerun(bench, count, rounds, report_round=None):
    """N stopped instances re-run with nothing to change: one batch task vs community.libvirt.virt in a loop.

    Each round runs the batch, the loop and ansible.builtin.ping (Ansible's per-task floor) once, in that order;
    ``report_round(index, figures)`` is called after each round.
    """
    names = ["%s-r%02d" % (bench.tag, index) for index in range(count)]
    batch_args = bench.module_args(state="stopped", instances=[{"name": name} for name in names])
    created = instances.run(bench.module(state="stopped", instances=[{"name": n} for n in names]))
    assert created["changed"], created
    with Counted() as counted:
        started = time.perf_counter()
        again = instances.run(bench.module(state="stopped", instances=[{"name": n} for n in names]))
        in_process = time.perf_counter() - started
    assert not again["changed"], again["actions"]
    batch_task = {"name": "batch", "smallcloud.kvm.instance": batch_args}
    loop_task = {"name": "loop", "community.libvirt.virt": {"name": "{{ item }}", "state": "shutdown",
                                                            "uri": URI}, "loop": names}
    floor_task = {"name": "floor", "ansible.builtin.ping": {}}
    kinds = ("batch", "loop", "floor")
    times = {key: [] for kind in kinds for key in (kind, kind + "_wall")}
    for index in range(rounds):
        for kind, task in zip(kinds, (batch_task, loop_task, floor_task)):
            task_s, wall_s, run = playbook_seconds(task)
            assert run.changed_count() == 0, "the %s re-run changed something" % kind
            times[kind].append(task_s)
            times[kind + "_wall"].append(wall_s)
        if report_round:
            report_round(index, {key: values[-1] for key, values in times.items()})
    instances.run(bench.module(state="absent", instances=[{"name": n} for n in names]))
    best = {kind: min(values) for kind, values in times.items()}
    ratios = [loop / batch for loop, batch in zip(times["loop"], times["batch"])]
    wall_ratios = [loop / batch for loop, batch in zip(times["loop_wall"], times["batch_wall"])]
    return {"instances": count, "rounds": rounds, "batch_s": round(best["batch"], 3), "loop_s": round(best["loop"], 3),
            "ratio": round(best["loop"] / best["batch"], 1), "batch_wall_s": round(best["batch_wall"], 3),
            "loop_wall_s": round(best["loop_wall"], 3), "wall_ratio": round(best["loop_wall"] / best["batch_wall"], 1),
            "floor_s": round(best["floor"], 3), "floor_wall_s": round(best["floor_wall"], 3),
            "round_ratios": [round(ratio, 1) for ratio in ratios],
            "round_wall_ratios": [round(ratio, 1) for ratio in wall_ratios],
            "rounds_all": {key: [round(value, 3) for value in values] for key, values in times.items()},
            "batch_in_process_s": round(in_process, 3), "batch_etcd_requests": counted.etcd,
            "batch_commands": counted.commands, "batch_libvirt_connections": counted.connections}


def measure_startup(runs):
    """The instance module's import start-up beyond ansible.module_utils.basic, as AnsiballZ ships it (zip)."""
    collection = module_startup.COLLECTIONS / "ansible_collections" / "smallcloud" / "kvm"
    work = tempfile.mkdtemp(prefix="sct-startup-")
    try:
        report = module_startup.measure(module_startup.MANAGED_PYTHON,
                                        module_startup.payload_zip(work, collection.resolve()), ["instance"], runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if report["failed"]:
        raise RuntimeError("the instance module does not import: %s" % report["failed"]["instance"])
    figures = report["modules"]["instance"]
    return {"floor_import_s": round(report["floor"]["total_us"] / 1e6, 3),
            "import_s": round(figures["total_us"] / 1e6, 3),
            "over_floor_s": round(figures["over_floor_us"] / 1e6, 3),
            "etcd3gw_s": round(figures["deferred_us"] / 1e6, 3),
            "packages_s": {name: round(us / 1e6, 3)
                           for name, us in sorted(figures["packages"].items(), key=lambda item: -item[1])[:8]}}


def print_round(index, figures, out=sys.stdout):
    print("  round %d: batch %.3f s task (%.3f s playbook), loop %.3f s task (%.3f s playbook), ratio %.1f task "
          "(%.1f playbook); floor (ping) %.3f s task" % (
              index + 1, figures["batch"], figures["batch_wall"], figures["loop"], figures["loop_wall"],
              figures["loop"] / figures["batch"], figures["loop_wall"] / figures["batch_wall"], figures["floor"]),
          file=out, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="1 start round, 3 instances, 1 re-run round")
    parser.add_argument("--rounds", type=int, default=5, help="start rounds per side")
    parser.add_argument("--instances", type=int, default=30, help="instances in the re-run batch")
    parser.add_argument("--rerun-rounds", type=int, default=3, help="re-run rounds (batch, loop, floor each)")
    parser.add_argument("--rerun-only", action="store_true", help="skip the start comparison (quicker)")
    parser.add_argument("--startup-runs", type=int, default=5,
                        help="runs of the instance module's import start-up measure (0: skip)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout (round lines on stderr)")
    args = parser.parse_args(argv)
    if args.quick:
        rounds, count, rerun_rounds, startup_runs = 1, 3, 1, 1
    else:
        rounds, count, rerun_rounds, startup_runs = args.rounds, args.instances, args.rerun_rounds, args.startup_runs
    out = sys.stderr if args.json else sys.stdout
    daemons = Libvirtd()  # the one that answers, else virtlogd + libvirtd started here and stopped at the end
    bench = Bench()
    report = {}
    try:
        if not args.rerun_only:
            report["start"] = measure_start(bench, rounds)
            print_start(report["start"], out)
        print("no-change re-run of %d instances (task time from the callback, playbook wall time)" % count,
              file=out, flush=True)
        report["rerun"] = measure_rerun(bench, count, rerun_rounds,
                                        lambda index, figures: print_round(index, figures, out))
    finally:
        bench.cleanup()
        daemons.stop()
    if startup_runs:
        report["startup"] = measure_startup(startup_runs)
    if args.json:
        print(json.dumps(report))
        return 0
    print_rerun(report["rerun"], report.get("startup"), out)
    return 0


def print_start(start, out):
    print("start from a warm cache to running (median of %d)" % start["rounds"], file=out)
    print("  module   %.3f s" % start["module_s"], file=out)
    print("  baseline %.3f s   (qemu-img create -b + virsh define + virsh start)" % start["baseline_s"], file=out)
    print("  ratio    %.2f   (goal <= 1.3)" % start["ratio"], file=out, flush=True)


def print_rerun(rerun, startup, out):
    print("  best of %d rounds:" % rerun["rounds"], file=out)
    print("  batch    %.3f s task, %.3f s playbook   (one smallcloud.kvm.instance task; in-process %.3f s)"
          % (rerun["batch_s"], rerun["batch_wall_s"], rerun["batch_in_process_s"]), file=out)
    print("  loop     %.3f s task, %.3f s playbook   (community.libvirt.virt over %d items)"
          % (rerun["loop_s"], rerun["loop_wall_s"], rerun["instances"]), file=out)
    print("  floor    %.3f s task, %.3f s playbook   (ansible.builtin.ping: Ansible's per-task floor)"
          % (rerun["floor_s"], rerun["floor_wall_s"]), file=out)
    print("  ratio    %.1f task, %.1f playbook   (goal >= 10); per round: %s task, %s playbook" % (
        rerun["ratio"], rerun["wall_ratio"], ", ".join("%.1f" % ratio for ratio in rerun["round_ratios"]),
        ", ".join("%.1f" % ratio for ratio in rerun["round_wall_ratios"])), file=out)
    print("  the batch re-run made %d libvirt connection(s), %d etcd request(s), ran %d command(s)"
          % (rerun["batch_libvirt_connections"], rerun["batch_etcd_requests"], rerun["batch_commands"]), file=out)
    if startup:
        rest = rerun["batch_s"] - rerun["floor_s"] - startup["over_floor_s"] - rerun["batch_in_process_s"]
        print("what the batch task's %.3f s consists of:" % rerun["batch_s"], file=out)
        print("  %.3f s  Ansible's per-task floor (the ping task: AnsiballZ, Python, ansible.module_utils.basic)"
              % rerun["floor_s"], file=out)
        print("  %.3f s  the instance module's start-up beyond basic (-X importtime, AnsiballZ-like zip, median; "
              "etcd3gw %.3f s of it)" % (startup["over_floor_s"], startup["etcd3gw_s"]), file=out)
        print("  %.3f s  the converge itself, in-process (1 libvirt connection, 1 etcd listing)"
              % rerun["batch_in_process_s"], file=out)
        print("  %.3f s  the rest (argument validation of %d entries, result JSON, noise)" % (rest, rerun["instances"]),
              file=out)
        print("  biggest imports beyond basic: %s" % ", ".join(
            "%s %.3f s" % item for item in startup["packages_s"].items()), file=out)


if __name__ == "__main__":
    sys.exit(main())
