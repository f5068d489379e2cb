"""The cloud across a lab of 3 hosts, each ratio measured in one run (issue 12).

1. first converge of N instances per host (a blank 64 MiB disk: no guest OS needed, as in instance_start.py)
     parallel     smallcloud.kvm.converge on all hosts at once (what an operator runs)
     one by one   the same converge with ``--limit h1``, then h2, then h3 (the same work, host after host)
   ratio = one by one / parallel: above 1 when the hosts work at the same time.
2. no-op re-converge of the whole cloud, alternating with
     floor        a play running only ansible.builtin.ping on the same hosts over SSH (Ansible's own floor)
   ratio = converge / floor per round (goal <= 2); each re-converge must report changed=0.

Makes its own lab (``smallcloud lab up --hosts 3`` in a scratch directory), serves the disk over HTTP on the
lab's underlay, deploys (3-member etcd with TLS and client certificates), and takes everything down at the end.

    .venv/bin/python bench/multihost.py                       # 10 instances per host, 3 re-converge rounds
    .venv/bin/python bench/multihost.py --per-host 3 --rounds 1
    .venv/bin/python bench/multihost.py --json
"""

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import ansible as ansible_harness  # noqa: E402

SMALLCLOUD = Path(sys.executable).parent / "smallcloud"
HOSTS = ("h1", "h2", "h3")
SERVER = ("10.250.0.1", 8096)  # the lab's underlay bridge on this machine


def lab(directory, *args):
    result = subprocess.run([str(SMALLCLOUD), "lab", *args, "--dir", str(directory)], capture_output=True, text=True,
                            env=ansible_harness.ansible_env(), check=False, timeout=600)
    if result.returncode != 0:
        raise SystemExit("smallcloud lab %s failed: %s" % (" ".join(args), result.stderr.strip()))
    return result


def cloud_data(image_url, digest, per_host):
    image = {"url": image_url, "checksum": "sha256:" + digest}
    return {
        "cloud_images": [image],
        "cloud_networks": [{"name": "bench-net", "cidr": "10.71.0.0/16", "gateway_host": "h1"}],
        "cloud_instances": [{"name": "%s-i%02d" % (host, index), "host": host, "image": image_url,
                             "image_checksum": image["checksum"], "memory": 64, "cpus": 1, "networks": ["bench-net"]}
                            for host in HOSTS for index in range(per_host)],
        # The guests boot no OS, so ACPI never stops them: teardown forces them off after 2 s.
        "cloud_shutdown_timeout": 2,
    }


class Lab:
    """Scratch directory, lab, disk server; ``close()`` removes all of it."""

    def __init__(self, per_host):
        self.work = Path(tempfile.mkdtemp(prefix="sct-bench-multihost-", dir="/var/tmp"))
        self.dir = self.work / "lab"
        served = self.work / "served"
        served.mkdir()
        disk = served / "blank.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        digest = hashlib.sha256(disk.read_bytes()).hexdigest()
        self.server = None
        lab(self.dir, "up", "--hosts", str(len(HOSTS)))
        self.inventory = self.dir / "inventory.ini"
        self.server = subprocess.Popen(  # noqa: S603 - argv list
            [sys.executable, "-m", "http.server", str(SERVER[1]), "--bind", SERVER[0], "--directory", str(served)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.data = cloud_data("http://%s:%d/blank.qcow2" % SERVER, digest, per_host)

    def play(self, playbook, args=()):
        """(seconds, run) of one playbook on the lab."""
        started = time.perf_counter()
        run = ansible_harness.run_playbook(playbook, inventory=self.inventory, extra_vars=self.data, args=args,
                                           timeout=3600)
        seconds = time.perf_counter() - started
        if run.rc != 0:
            raise SystemExit("%s %s failed: %s" % (playbook, " ".join(args), run.stdout[-3000:] or run.stderr[-3000:]))
        return seconds, run

    def ping(self):
        started = time.perf_counter()
        run = ansible_harness.run_tasks([{"name": "ping", "ansible.builtin.ping": {}}], hosts="hypervisors",
                                        inventory=self.inventory)
        if run.rc != 0:
            raise SystemExit("ping failed: %s" % run.stdout[-2000:])
        return time.perf_counter() - started

    def close(self):
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        if self.dir.exists():
            lab(self.dir, "down")
        shutil.rmtree(self.work, ignore_errors=True)


def measure(bench, rounds):
    report = {"instances": len(bench.data["cloud_instances"])}
    report["deploy_s"] = round(bench.play("smallcloud.kvm.deploy")[0], 2)
    one_by_one = sum(bench.play("smallcloud.kvm.converge", args=("--limit", host))[0] for host in HOSTS)
    bench.play("smallcloud.kvm.teardown")
    parallel = bench.play("smallcloud.kvm.converge")[0]
    report["first_converge"] = {"parallel_s": round(parallel, 2), "one_by_one_s": round(one_by_one, 2),
                                "ratio": round(one_by_one / parallel, 2)}
    report["reconverge_rounds"] = []
    for _round in range(rounds):
        floor = bench.ping()
        seconds, run = bench.play("smallcloud.kvm.converge")
        changed = run.changed_count()
        report["reconverge_rounds"].append({"converge_s": round(seconds, 2), "ping_s": round(floor, 2),
                                            "ratio": round(seconds / floor, 2), "changed": changed})
    ratios = [entry["ratio"] for entry in report["reconverge_rounds"]]
    report["reconverge_ratio_median"] = statistics.median(ratios)
    bench.play("smallcloud.kvm.teardown")
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-host", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    bench = Lab(options.per_host)
    try:
        report = measure(bench, options.rounds)
    finally:
        bench.close()
    if options.json:
        print(json.dumps(report, indent=1))
        return
    first = report["first_converge"]
    print("first converge of %d instances on 3 hosts: parallel %.1f s, one host after another %.1f s, ratio %.2f"
          % (report["instances"], first["parallel_s"], first["one_by_one_s"], first["ratio"]))
    for index, entry in enumerate(report["reconverge_rounds"], 1):
        print("re-converge round %d: %.2f s against ping %.2f s: ratio %.2f (changed=%d)"
              % (index, entry["converge_s"], entry["ping_s"], entry["ratio"], entry["changed"]))
    print("median re-converge ratio %.2f (goal <= 2)" % report["reconverge_ratio_median"])


if __name__ == "__main__":
    main()
