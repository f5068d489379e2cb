"""The README's demo, end to end, through the `smallcloud demo` command: up (a guest answers HTTP through its
floating IP from the outside namespace), a re-run that changes nothing, and a teardown that leaves nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.ansible import ansible_env
from harness.host import cloud_traces

pytestmark = pytest.mark.e2e

SMALLCLOUD = Path(sys.executable).parent / "smallcloud"


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
    return cloud_traces(
        "demo-",
        processes=[("http.server", "8099"), ("smallcloud-demo-etcd",), ("dnsmasq", "smallcloud")],
        files=["/etc/init.d/smallcloud-demo-etcd", "/var/lib/smallcloud/demo", "/var/lib/etcd/smallcloud-demo-etcd"],
        link_prefixes=("scdemo",), namespace_prefixes=("smallcloud-demo",))


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


def test_an_unknown_demo_image_is_refused_naming_it_before_anything_changes():
    before = demo_traces()
    result = subprocess.run([str(SMALLCLOUD), "demo", "-e", "demo_image=centos"], capture_output=True, text=True,
                            env=ansible_env(), timeout=600, check=False)
    assert result.returncode != 0
    refused = task_result(json.loads(result.stdout), "Check the demo's input")
    assert refused["failed"] and "demo_image one of tiny, debian (got centos)" in refused["msg"], refused
    assert demo_traces() == before
