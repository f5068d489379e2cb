"""The README's demo, end to end, through the `smallcloud demo` command: up (a guest answers HTTP through its
floating IP from the outside namespace), a re-run that changes nothing, and a teardown that leaves nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.ansible import ansible_env
from harness.netns import netns_list

pytestmark = pytest.mark.e2e

SMALLCLOUD = Path(sys.executable).parent / "smallcloud"
DEMO_LINK_PREFIXES = ("vx-", "br-", "ve-", "vg-", "scdemo")


def demo(*args):
    """Run `smallcloud demo ARGS`; the JSON report of ansible-playbook."""
    result = subprocess.run([str(SMALLCLOUD), "demo", *args], capture_output=True, text=True, env=ansible_env(),
                            timeout=1800, check=False)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"smallcloud demo {args} gave no report (rc={result.returncode}):\n{result.stderr[-4000:]}")
    stats = report["stats"]["localhost"]
    failed = [(task["task"]["name"], task["hosts"]["localhost"].get("msg"))
              for play in report["plays"] for task in play["tasks"]
              if task["hosts"].get("localhost", {}).get("failed")]
    assert result.returncode == 0 and stats["failures"] == 0, failed
    return report, stats


def demo_traces():
    """What the demo could leave on this machine."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return {
        "namespaces": sorted(n for n in netns_list() if n.startswith(("scnet-", "smallcloud-demo"))),
        "links": sorted(line.split(": ")[1].split("@")[0] for line in links.splitlines()
                        if line.split(": ")[1].startswith(DEMO_LINK_PREFIXES)),
        "domains": sorted(d for d in subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                                    capture_output=True, text=True, check=False).stdout.split()
                          if d.startswith("demo-")),
        "processes": sorted(p for p in processes.splitlines()
                            if ("http.server" in p and "8099" in p) or "smallcloud-demo-etcd" in p
                            or ("dnsmasq" in p and "smallcloud" in p)),
        "files": sorted(str(p) for p in (Path("/etc/init.d/smallcloud-demo-etcd"), Path("/var/lib/smallcloud/demo"),
                                         Path("/var/lib/etcd/smallcloud-demo-etcd")) if p.exists()),
    }


def task_result(report, name):
    return next(task["hosts"]["localhost"] for play in report["plays"] for task in play["tasks"]
                if task["task"]["name"] == name)


def test_demo_comes_up_reruns_unchanged_and_tears_down(machine_as_found):
    before = demo_traces()
    try:
        report, stats = demo()
        assert stats["changed"] > 0
        summary = task_result(report, "Summary")["msg"]
        assert sorted(summary["instances"]) == ["demo-web1", "demo-web2"]
        answer = task_result(report, "Wait until demo-web1 answers HTTP through its floating IP, from the "
                                     "outside namespace")
        assert answer["stdout"].strip() == "demo-web1"  # the guest's own hostname, through DNAT from outside
        assert "203.0.113." in summary["floating_ip"]

        _again, stats = demo()
        assert stats["changed"] == 0
    finally:
        demo("--teardown")
    assert demo_traces() == before
