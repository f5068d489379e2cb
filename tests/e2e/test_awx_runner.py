"""AWX/Tower run job templates through ansible-runner: deploy + converge from a private data dir laid out the way
AWX lays it out (project/, inventory/, env/), run with `smallcloud runner run`, end with no failed host."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness.ansible import MANAGED_PYTHON, ansible_env
from harness.netns import netns_list

pytestmark = pytest.mark.e2e

SMALLCLOUD = Path(sys.executable).parent / "smallcloud"
ETCD_SERVICE = "smallcloud-awx-etcd"
ETCD_PORT = 23811
PREFIX = "/smallcloud-awx/v1"
NETWORK = {"name": "awx-net", "cidr": "10.124.0.0/24"}

SITE = """\
- name: Deploy etcd and the hypervisors
  ansible.builtin.import_playbook: smallcloud.kvm.deploy
- name: Converge the cloud
  ansible.builtin.import_playbook: smallcloud.kvm.converge
"""
TEARDOWN = """\
- name: Tear the cloud down
  ansible.builtin.import_playbook: smallcloud.kvm.teardown
"""
REMOVE_ETCD = """\
- name: Remove the etcd member with its data
  ansible.builtin.import_playbook: smallcloud.kvm.etcd_remove
  vars:
    etcd_remove_data: true
"""


def private_data_dir(root):
    """project/ with the job template's playbooks, inventory/hosts, env/{extravars,envvars,settings}."""
    (root / "project").mkdir(parents=True)
    (root / "project" / "site.yml").write_text(SITE)
    (root / "project" / "teardown.yml").write_text(TEARDOWN)
    (root / "project" / "remove_etcd.yml").write_text(REMOVE_ETCD)
    (root / "inventory").mkdir()
    host = {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": MANAGED_PYTHON}}
    (root / "inventory" / "hosts").write_text(yaml.safe_dump(
        {"all": {"children": {"etcd": {"hosts": host}, "hypervisors": {"hosts": host}}}}))
    (root / "env").mkdir()
    (root / "env" / "extravars").write_text(yaml.safe_dump({
        "etcd_name": "awx", "etcd_address": "127.0.0.1", "etcd_listen_client_addresses": ["127.0.0.1"],
        "etcd_listen_peer_addresses": ["127.0.0.1"], "etcd_client_port": ETCD_PORT, "etcd_peer_port": ETCD_PORT + 1,
        "etcd_service_name": ETCD_SERVICE, "etcd_cluster_token": "smallcloud-awx",
        "etcd_client_dir": str(root / "client"),
        "cloud_etcd_endpoints": ["http://127.0.0.1:%d" % ETCD_PORT], "cloud_etcd_prefix": PREFIX,
        "cloud_networks": [NETWORK],
    }))
    # AWX puts the project's collections on the path; here that is this checkout.
    (root / "env" / "envvars").write_text(yaml.safe_dump(
        {"ANSIBLE_COLLECTIONS_PATH": ansible_env()["ANSIBLE_COLLECTIONS_PATH"]}))
    (root / "env" / "settings").write_text(yaml.safe_dump({"idle_timeout": 900, "job_timeout": 1800}))
    return root


def run_job(data_dir, playbook, ident):
    """`smallcloud runner run` the playbook; the job's events, in order."""
    result = subprocess.run([str(SMALLCLOUD), "runner", "run", str(data_dir), "-p", playbook, "--ident", ident],
                            capture_output=True, text=True, env=ansible_env(), timeout=1800, check=False)
    events_dir = data_dir / "artifacts" / ident / "job_events"
    events = sorted((json.loads(path.read_text()) for path in events_dir.glob("*.json")),
                    key=lambda event: event["counter"])
    status = (data_dir / "artifacts" / ident / "status").read_text().strip()
    return result, events, status


def final_stats(events):
    stats = [event for event in events if event["event"] == "playbook_on_stats"]
    assert stats, "the event stream has no playbook_on_stats"
    return stats[-1]["event_data"]


def test_deploy_and_converge_through_ansible_runner(tmp_path, machine_as_found):
    data_dir = private_data_dir(tmp_path / "awx-job")
    namespaces_before = set(netns_list())
    try:
        result, events, status = run_job(data_dir, "site.yml", "deploy-converge")
        stats = final_stats(events)
        assert status == "successful", result.stdout[-3000:]
        assert stats["failures"] == {} and stats["dark"] == {}, stats
        assert "localhost" in stats["ok"]
        converged = [event for event in events if event["event"] == "runner_item_on_ok"
                     and event["event_data"].get("task_action") == "smallcloud.kvm.network"]
        assert converged and converged[-1]["event_data"]["res"]["vni"] > 0
        assert any(name.startswith("scnet-") for name in set(netns_list()) - namespaces_before)
    finally:
        _result, events, status = run_job(data_dir, "teardown.yml", "teardown")
        teardown_stats = final_stats(events)
        _result, events, removed = run_job(data_dir, "remove_etcd.yml", "remove-etcd")
    assert status == "successful" and teardown_stats["failures"] == {}, teardown_stats
    assert removed == "successful", final_stats(events)
    assert set(netns_list()) == namespaces_before
    assert not [path for path in (Path("/etc/init.d") / ETCD_SERVICE, Path("/etc/etcd") / f"{ETCD_SERVICE}.conf.yml",
                                  Path("/var/lib/etcd") / ETCD_SERVICE) if path.exists()]
