"""Security groups for real: the ``security_group`` module on etcd, the instance module writing the host's
``inet smallcloud_guests`` table from the records, and the table's rules enforced on bridged traffic between
network namespaces that stand for guests (real bridge with nf_call_iptables, real conntrack, real nft).

The guests of the enforcement test are namespaces, not VMs: what is tested is the table on a bridge, and a
namespace sends the same frames through the same bridge port kind a guest's tap is (the lab e2e test reaches a
real guest through its floating IP)."""

import json
import os
import subprocess
import sys

import pytest
from harness.instances import domain_state, virsh
from harness.paths import ROOT
from harness.ports import wait_for

pytestmark = pytest.mark.integration

TABLE = "smallcloud_guests"
CIDR, FAR_CIDR = "10.77.0.0/24", "10.78.0.0/24"
G1, G2, FAR = "10.77.0.5", "10.77.0.6", "10.78.0.9"


def nft_table(netns=None):
    """The guest filter's table as nft prints it, or None."""
    argv = ["nft", "list", "table", "inet", TABLE]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    listed = subprocess.run(argv, capture_output=True, text=True, check=False)
    return listed.stdout if listed.returncode == 0 else None


# the modules --------------------------------------------------------------------------------------------


def group_args(etcd, name, rules, **extra):
    return dict(etcd.module_args, name=name, rules=rules, **extra)


def test_security_group_module_check_diff_idempotence_and_refusals(etcd, ansible):
    web = group_args(etcd, "web", [{"protocol": "tcp", "port": 80}, {"protocol": "icmp"}], description="web")
    preview = ansible.run_module("security_group", web, check=True, diff=True)
    assert preview["changed"] is True and preview["diff"]["before"] == {"security_group": None}
    assert etcd.key_count() == 0, "check mode wrote to etcd"
    created = ansible.run_module("security_group", web, diff=True)
    assert created["changed"] is True and created["security_group"]["rules"][0] == {
        "direction": "ingress", "protocol": "tcp", "ports": "80", "cidr": "0.0.0.0/0", "group": None}
    assert ansible.run_module("security_group", web)["changed"] is False

    db = group_args(etcd, "db", [{"protocol": "tcp", "port": 5432, "group": "web"}])
    assert ansible.run_module("security_group", db)["changed"] is True
    nowhere = ansible.run_module("security_group", group_args(etcd, "x", [{"group": "nowhere"}]))
    assert nowhere.get("failed") and "'nowhere', which does not exist" in nowhere["msg"]
    both = ansible.run_module("security_group", group_args(etcd, "x", [{"group": "web", "cidr": "10.0.0.0/8"}]))
    assert both.get("failed") and "mutually exclusive" in both["msg"]
    ranged = ansible.run_module("security_group", group_args(etcd, "x", [{"protocol": "udp", "port": "9-1"}]))
    assert ranged.get("failed") and "'9-1'" in ranged["msg"] and "1..65535" in ranged["msg"]

    # "web" is named by db's rule: refused, naming it; db goes first, then web.
    refused = ansible.run_module("security_group", dict(web, state="absent"))
    assert refused.get("failed") and "rules of groups ['db']" in refused["msg"]
    for gone in (db, web):
        assert ansible.run_module("security_group", dict(gone, state="absent"))["changed"] is True
    assert etcd.key_count() == 0


def test_instances_take_groups_and_the_host_table_follows_records_without_restarts(cloud, ansible):
    name = cloud.name()
    web = group_args(cloud.etcd, "web", [{"protocol": "tcp", "port": 80}])
    assert ansible.run_module("security_group", web)["changed"] is True

    unknown = ansible.run_module("instance", cloud.args(name=name, security_groups=["web", "nope"]))
    assert unknown.get("failed") and "security group nope does not exist; existing groups: ['web']" in unknown["msg"]
    assert cloud.leftovers(name) == [] and nft_table() is None

    created = ansible.run_module("instance", cloud.args(name=name, security_groups=["web"]))
    assert created["changed"] is True and created["security_groups"] == ["web"], created.get("msg")
    # Written before the guest started (and not again at the batch's end: nothing changed since).
    assert "write this host's security groups, %s's included" % name in created["actions"]
    [ip] = created["ips"]
    table = nft_table()
    assert 'oifname "%s" ip daddr %s jump in-%s-0' % (cloud.bridge, ip, name) in table
    assert "tcp dport 80 return" in table
    rerun = ansible.run_module("instance", cloud.args(name=name, security_groups=["web"]))
    assert rerun["changed"] is False, rerun["actions"]
    domain_id = virsh("domid", name).stdout.strip()

    # A changed group reaches the host with the next instance run there; the guest keeps running.
    assert ansible.run_module("security_group", dict(web, rules=[{"protocol": "tcp", "port": 8080}]))["changed"]
    preview = ansible.run_module("instance", cloud.args(name=name, security_groups=["web"]), check=True)
    assert preview["changed"] is True and "tcp dport 80 return" in nft_table()
    moved = ansible.run_module("instance", cloud.args(name=name, security_groups=["web"]))
    assert moved["changed"] is True and moved["actions"] == [
        a for a in moved["actions"] if a.startswith("host: ")], moved["actions"]
    assert "tcp dport 8080 return" in nft_table() and "dport 80 " not in nft_table()
    assert virsh("domid", name).stdout.strip() == domain_id and domain_state(name) == "running"

    # Leaving the group is a record change only; the table drops the rule.
    left = ansible.run_module("instance", cloud.args(name=name))
    assert left["changed"] is True and left["needs_restart"] is False and "8080" not in nft_table()
    refused = ansible.run_module("security_group", dict(web, state="absent"))
    assert refused["changed"] is True  # nobody is in it any more

    gone = dict(cloud.etcd.module_args, name=name, state="absent", instances_dir=cloud.instances_dir,
                shutdown_timeout=1)
    removed = ansible.run_module("instance", gone)
    assert removed["changed"] is True and nft_table() is None, removed["actions"]


# enforcement on a bridge ----------------------------------------------------------------------------------

APPLY = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import guest_filter
given = json.load(sys.stdin)
plan = Plan()
guest_filter.plan(plan, given["host"], given["instances"], lambda: given["groups"], lambda: given["networks"])
plan.apply(False)
print(json.dumps(plan.actions))
"""


class Segment:
    """A hypervisor namespace with a bridge (nf_call_iptables on) and namespaces on it standing for guests."""

    def __init__(self, netns):
        self.host = netns.create()
        self.guests = {}
        subprocess.run(["ip", "-n", self.host, "link", "add", "br-sg", "type", "bridge", "nf_call_iptables", "1"],
                       check=True)
        subprocess.run(["ip", "-n", self.host, "link", "set", "br-sg", "up"], check=True)
        for index, (label, address, other) in enumerate([("g1", G1, FAR_CIDR), ("g2", G2, FAR_CIDR),
                                                        ("far", FAR, CIDR)]):
            guest = netns.create()
            port = "tap%d" % index
            subprocess.run(["ip", "-n", self.host, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                            "netns", guest], check=True)
            subprocess.run(["ip", "-n", self.host, "link", "set", port, "master", "br-sg", "up"], check=True)
            subprocess.run(["ip", "-n", guest, "addr", "add", address + "/24", "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", guest, "link", "set", "eth0", "up"], check=True)
            # The other subnet is on the same segment: "far" stands for traffic from outside the network.
            subprocess.run(["ip", "-n", guest, "route", "add", other, "dev", "eth0"], check=True)
            self.guests[label] = guest
        self.servers = []

    def serve(self, label, address, *ports):
        for port in ports:
            self.servers.append(subprocess.Popen(  # noqa: S603 - argv list
                ["ip", "netns", "exec", self.guests[label], sys.executable, "-m", "http.server", str(port), "--bind",
                 address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/"))
        for port in ports:
            wait_for(lambda port=port: self.listening(label, port), 30, interval=0.1, what="port %d" % port)

    def listening(self, label, port):
        listed = subprocess.run(["ip", "netns", "exec", self.guests[label], "ss", "-Hltn", "sport", "=", ":%d" % port],
                                capture_output=True, text=True, check=False)
        return bool(listed.stdout.strip())

    def reaches(self, label, address, port):
        """Whether a TCP connection from guest ``label`` to ``address:port`` is answered within a second."""
        probe = subprocess.run(["ip", "netns", "exec", self.guests[label], "nc", "-z", "-w", "1", address,
                                str(port)], capture_output=True, check=False, timeout=10)
        return probe.returncode == 0

    def converge(self, instances, groups):
        """The guest filter of this "host", as the instance module converges it; the actions taken."""
        given = {"host": "hv", "instances": instances, "groups": groups,
                 "networks": {"net1": {"cidr": CIDR}}}
        ran = subprocess.run(["ip", "netns", "exec", self.host, sys.executable, "-c", APPLY,
                              str(ROOT / ".cache" / "collections")], input=json.dumps(given), capture_output=True,
                             text=True, check=False, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        assert ran.returncode == 0, ran.stderr
        return json.loads(ran.stdout)

    def stop(self):
        for server in self.servers:
            server.kill()
            server.wait()


def guest(ip, *groups):
    return {"host": "hv", "interfaces": [{"network": "net1", "ip": ip}], "bridges": {"net1": "br-sg"},
            "security_groups": list(groups)}


def rules(*given):
    from ansible_collections.smallcloud.kvm.plugins.module_utils.network.security_groups import normalize_rules

    return {"rules": normalize_rules("test", list(given))}


def rule(**given):
    return dict({"direction": None, "protocol": None, "port": None, "cidr": None, "group": None}, **given)


@pytest.fixture
def segment(netns):
    made = Segment(netns)
    try:
        yield made
    finally:
        made.stop()


def test_groups_are_enforced_statefully_on_bridged_traffic(segment):
    segment.serve("g1", G1, 80, 81)
    segment.serve("far", FAR, 80)
    segment.serve("g2", G2, 80)
    web = rules(rule(protocol="tcp", port=80))
    instances = {"g1": guest(G1, "web"), "g2": guest(G2)}
    assert segment.reaches("far", G1, 81), "nothing filters before the table exists"

    actions = segment.converge(instances, {"web": web})
    assert actions and actions[0].startswith("write nft table inet %s" % TABLE)
    assert segment.reaches("far", G1, 80)  # the group's port, from outside the network
    assert not segment.reaches("far", G1, 81)  # any other port from outside: dropped
    assert segment.reaches("g2", G1, 81)  # the own network: allowed by default
    assert segment.reaches("g1", FAR, 80)  # egress open, the reply passes (conntrack)
    assert not segment.reaches("far", G2, 80)  # no group: nothing from outside
    assert segment.converge(instances, {"web": web}) == [], "an unchanged table was written again"
    # A table changed behind the module's back (a chain added by hand) is written again.
    subprocess.run(["ip", "netns", "exec", segment.host, "nft", "add", "chain", "inet", TABLE, "extra"], check=True)
    assert segment.converge(instances, {"web": web}) != [] and "extra" not in nft_table(segment.host)

    # New rules replace the old ones in place; the listeners (the guests) are not touched.
    segment.converge(instances, {"web": rules(rule(protocol="tcp", port="81-82"))})
    assert not segment.reaches("far", G1, 80) and segment.reaches("far", G1, 81)

    # Egress rules close egress to the own network and what they allow.
    locked = rules(rule(direction="egress", protocol="udp", port=53, cidr="192.0.2.53/32"))
    segment.converge({"g1": guest(G1, "web"), "g2": guest(G2, "locked")}, {"web": web, "locked": locked})
    assert not segment.reaches("g2", FAR, 80) and segment.reaches("g2", G1, 80)

    # A remote group: g1's members reach g2's port 80 from outside... the network is shared, so show it from
    # "far" joining the group (its address becomes a member of "front").
    front = rules(rule(protocol="tcp", port=80, group="front"))
    members = {"g2": guest(G2, "front"), "far": dict(guest(FAR, "front"), host="elsewhere")}
    segment.converge(members, {"front": front})
    assert segment.reaches("far", G2, 80)
    # The members' set counts in the table's use count, as its chains do: a re-run finds nothing to do.
    assert segment.converge(members, {"front": front}) == [], "a table with a remote group's set was written again"
    segment.converge({"g2": guest(G2, "front"), "far": dict(guest(FAR), host="elsewhere")}, {"front": front})
    assert not segment.reaches("far", G2, 80)

    assert segment.converge({}, {}) == ["delete nft table inet %s (no guest on this host)" % TABLE]
    assert nft_table(segment.host) is None
