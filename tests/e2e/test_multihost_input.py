"""Bad input to the multi-host deploy and converge (issue 12) is refused before anything changes.

Each case runs on this machine through ``ansible_connection=local`` inventories and stops in a preflight
assert: the test checks the failing task by name, that its message names the value and what is allowed,
that no task after the preflight ran and that nothing reported a change. Every run is ``--check`` and,
for the roles, limited to the preflight tag, so even a preflight that let bad input through could not
alter the machine (or the lab another test may be running on it). etcd members get scratch service
names, ports and directories, as in test_etcd_role.py, and the cloud's modules an etcd endpoint nobody
listens on.
"""

import json
import uuid

import pytest
import yaml
from harness.ansible import MANAGED_PYTHON, task_name
from harness.paths import ROOT
from harness.ports import free_port

pytestmark = pytest.mark.e2e

LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": MANAGED_PYTHON, "ansible_pipelining": True}
# Tasks Ansible itself adds before a play's or a role's own tasks.
FRAMEWORK_TASKS = ("Gathering Facts", "Validating arguments against arg spec")
PLAINTEXT = "Refuse plaintext etcd off loopback"
EVEN = "Warn about an even number of members"


def preflight_tasks(role):
    """The task names of ``role``'s tasks/preflight.yml."""
    return {task["name"] for task in yaml.safe_load((ROOT / "roles" / role / "tasks" / "preflight.yml").read_text())}


def assert_refused(run, task, *needles):
    """The run failed in ``task`` only, and every failure message holds every needle; returns the messages."""
    found = run.failures()
    output = f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.rc != 0 and found, output
    assert {name for name, _host, _message in found} == {task}, found
    for _name, _host, message in found:
        for needle in needles:
            assert needle in message, (needle, message)
    return [message for _name, _host, message in found]


def assert_only(run, allowed):
    """No task outside ``allowed`` (and Ansible's own) ran, and no host reported a change."""
    ran = [task_name(task) for task in run.tasks]
    assert [name for name in ran if name not in allowed and not name.startswith(FRAMEWORK_TASKS)] == [], ran
    assert run.stats and all(host.get("changed", 0) == 0 for host in run.stats.values()), run.stats


def write_inventory(path, groups):
    """An inventory file of ``groups`` (group -> {host: hostvars}), every host local; returns its path."""
    children = {group: {"hosts": hosts, "vars": LOCAL} for group, hosts in groups.items()}
    path.write_text(json.dumps({"all": {"children": children}}))
    return path


class EtcdMembers:
    """Inventories of etcd members on this host with scratch service names, ports and directories."""

    def __init__(self, base):
        self.base = base
        self.token = f"sct{uuid.uuid4().hex[:8]}"
        self.play = base / "etcd.yml"
        self.play.write_text(json.dumps([{"name": "etcd", "hosts": "etcd", "gather_facts": False,
                                          "roles": ["smallcloud.kvm.etcd"]}]))

    def inventory(self, members, **group_vars):
        """An inventory whose `etcd` group holds ``members`` (name -> host vars); returns its path."""
        hosts = {}
        for name, extra in members.items():
            hosts[name] = {
                "etcd_name": name,
                "etcd_service_name": f"{self.token}-{name}",
                "etcd_client_port": free_port(),
                "etcd_peer_port": free_port(),
                "etcd_data_dir": str(self.base / name / "data"),
                "etcd_tls_dir": str(self.base / name / "pki"),
                "etcd_cluster_token": self.token,
                "etcd_config_dir": str(self.base / "etc"),
                "etcd_log_dir": str(self.base / "log"),
                "etcd_tls_ca_dir": str(self.base / "ca"),
                "etcd_client_dir": str(self.base / "client"),
                **group_vars,
                **extra,
            }
        return write_inventory(self.base / f"inventory-{uuid.uuid4().hex[:6]}.json", {"etcd": hosts})

    def preflight(self, ansible, inventory, **extra_vars):
        """Run the role's preflight only, in check mode."""
        return ansible.run_playbook(self.play, inventory=inventory, extra_vars=extra_vars or None, check=True,
                                    args=["--tags", "etcd_preflight"])


@pytest.fixture
def members(tmp_path):
    yield EtcdMembers(tmp_path)
    # Only preflight ran: nothing may have been written, not even below the scratch directory.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("etcd.yml", "inventory-"))) == []


def test_deploy_without_etcd_group_names_the_group_and_the_inventory_groups(ansible, tmp_path):
    # --check although the pre_task fails before the role: were the assert ever to pass, the hypervisor
    # role would install packages, take libvirt's default network and tune KSM on a machine another
    # engineer's lab runs on. An invalid hypervisor_virt_type is a second stop: the role's argument
    # validation would fail first (and this test would see a hypervisor task run).
    inventory = write_inventory(tmp_path / "inventory.json",
                                {"hypervisors": {"localhost": {"hypervisor_virt_type": "not-checked"}}})
    run = ansible.run_playbook("smallcloud.kvm.deploy", inventory=inventory, check=True)

    (message,) = assert_refused(run, "Check that the inventory names the etcd members",
                                "the inventory has no hosts in group 'etcd' (etcd_cluster_group)",
                                "add one host (or 3, 5) to that group", "Groups: ['hypervisors']")
    assert_only(run, {"Check that the inventory names the etcd members"})
    assert not any(task["task"]["name"].startswith("smallcloud.kvm.hypervisor") for task in run.tasks), message


def test_plaintext_client_off_loopback_is_refused_unless_allowed(ansible, members):
    inventory = members.inventory({"solo": {}}, etcd_address="192.0.2.10",
                                  etcd_listen_client_addresses=["192.0.2.10"], etcd_tls_client=False)

    run = members.preflight(ansible, inventory)
    assert_refused(run, PLAINTEXT, "etcd on solo would serve clients in plaintext on 192.0.2.10",
                   "etcd_tls_client", "etcd_allow_plaintext=true")
    assert_only(run, preflight_tasks("etcd"))

    run = members.preflight(ansible, inventory, etcd_allow_plaintext=True)
    assert run.rc == 0 and run.failures() == [], f"{run.failures()}\n{run.stderr[-3000:]}"
    assert any(task_name(task) == PLAINTEXT for task in run.tasks)
    assert_only(run, preflight_tasks("etcd"))


def test_a_single_plaintext_member_binds_to_loopback_by_default(ansible, members):
    def member(run):
        (fact,) = [result["ansible_facts"]["_etcd_member"] for task in run.tasks
                   if task_name(task) == "Record this member" for result in task["hosts"].values()]
        return fact

    # No address given, client TLS off (the default for one member), no opt-out: loopback, not refused. (With
    # etcd_allow_plaintext or client TLS the default is the host's address: the test above shows the refusal
    # and the opt-out for a plaintext address off loopback.)
    run = members.preflight(ansible, members.inventory({"solo": {}}))
    assert run.rc == 0 and run.failures() == [], f"{run.failures()}\n{run.stderr[-3000:]}"
    solo = member(run)
    assert solo["client_url"].startswith("http://127.0.0.1:") and solo["peer_url"].startswith("http://127.0.0.1:")
    assert solo["tls_client"] is False


def test_even_member_count_warns_and_advises_an_odd_one(ansible, members):
    inventory = members.inventory({"m1": {}, "m2": {}}, etcd_address="127.0.0.1", etcd_tls_client=False,
                                  etcd_tls_peer=False, etcd_tls_client_cert_auth=False)

    run = members.preflight(ansible, inventory)
    assert run.rc == 0 and run.failures() == [], f"{run.failures()}\n{run.stderr[-3000:]}"
    (warning,) = [result["msg"] for task in run.tasks if task_name(task) == EVEN
                  for result in task["hosts"].values() if not result.get("skipped")]
    assert warning.startswith("[WARNING] etcd cluster group 'etcd' has 2 members (m1, m2)"), warning
    assert "quorum 2" in warning and "use an odd count (1, 3, 5)" in warning, warning
    assert_only(run, preflight_tasks("etcd"))


def test_plaintext_peers_off_loopback_are_refused_naming_each_address(ansible, members):
    inventory = members.inventory({"p1": {"etcd_address": "192.0.2.11"}, "p2": {"etcd_address": "192.0.2.12"}},
                                  etcd_tls_client=True, etcd_tls_peer=False)

    run = members.preflight(ansible, inventory)
    messages = assert_refused(run, PLAINTEXT, "would serve its 2-member cluster's peers in plaintext on",
                              "etcd_tls_peer", "etcd_allow_plaintext=true")
    assert sorted((host, "on 192.0.2.1%s:" % host[-1] in message) for _name, host, message in run.failures()) == [
        ("p1", True), ("p2", True)], messages
    assert_only(run, preflight_tasks("etcd"))


@pytest.mark.parametrize("declared, task, needles", [
    pytest.param({"cloud_instances": [{"name": "vm-lost", "host": "elsewhere"}]},
                 "Check the role's variables",
                 ["instance vm-lost names host elsewhere, which is not in this play",
                  "instances run on the play's hypervisors: ['localhost']"],
                 id="instance-host"),
    pytest.param({"cloud_networks": [{"name": "net-lost", "cidr": "10.129.0.0/24", "gateway_host": "elsewhere"}]},
                 "Check the role's variables",
                 ["network net-lost has gateway_host elsewhere, which is not a hypervisor of this play",
                  "one of ['localhost']"],
                 id="network-gateway"),
    pytest.param({"cloud_networks": [{"name": "twice", "cidr": "10.129.0.0/24"},
                                     {"name": "twice", "cidr": "10.130.0.0/24"}]},
                 "Check the role's variables",
                 ["every network and instance needs a unique `name`; networks: ['twice', 'twice']"],
                 id="duplicate-name"),
    pytest.param({"cloud_floating_ips": [{"network": "nowhere", "instance": "vm"}]},
                 "Check the role's variables",
                 ["floating IP {'network': 'nowhere', 'instance': 'vm'} is incomplete",
                  "a floating IP needs `network` (one of [])"],
                 id="floating-ip"),
])
def test_converge_refuses_hosts_outside_the_play(ansible, tmp_path, declared, task, needles):
    # test_cloud_role.py converges only declarations that are valid: neither case is covered there.
    inventory = write_inventory(tmp_path / "inventory.json", {"hypervisors": {"localhost": {}}})
    extra = {"cloud_etcd_endpoints": [f"http://127.0.0.1:{free_port()}"], "cloud_etcd_prefix": "/sct-unused/v1",
             "cloud_image_cache_dir": str(tmp_path / "cache"), "cloud_instances_dir": str(tmp_path / "instances"),
             **declared}
    run = ansible.run_playbook("smallcloud.kvm.converge", inventory=inventory, extra_vars=extra, check=True)

    assert_refused(run, task, *needles)
    assert_only(run, preflight_tasks("cloud"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "instances").exists()
