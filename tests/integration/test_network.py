"""The network module on real namespaces, dnsmasq, nftables and etcd, driven through Ansible.

Lab (all namespaces made by the test, deleted afterwards):
  hypervisor namespace "hv" (the module's host_netns) -- ul0: underlay, 10.99.0.1/24
                                                     -- up0: uplink 198.51.100.2/24 <-> "outside" 198.51.100.1/24
  "outside" stands for the internet: it routes the egress/floating pool 192.0.2.0/24 back to hv.
  Guests are namespaces with eth0 veth'd onto br-<vni> in hv, taking DHCP with busybox udhcpc.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest
from harness.netns import delete_netns, netns_list

pytestmark = pytest.mark.integration

POOL = "192.0.2.0/24"
OUTSIDE_IP = "198.51.100.1"
UPLINK_IP = "198.51.100.2"
UDHCPC_SCRIPT = textwrap.dedent("""\
    #!/bin/sh
    # udhcpc calls this with the lease in the environment; apply it and record it.
    [ "$1" = bound ] || [ "$1" = renew ] || exit 0
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "$router"
    echo "$ip $mask $router $mtu" > "$LEASE_FILE"
""")
TCP_SERVER = textwrap.dedent("""\
    import socket, sys
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(sys.argv[1])))
    server.listen(8)
    print("ready", flush=True)
    while True:
        conn, peer = server.accept()
        conn.sendall(("hello %s" % peer[0]).encode())
        conn.close()
""")
TCP_CLIENT = textwrap.dedent("""\
    import socket, sys
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(conn.recv(100).decode())
""")


def ip(*args, check=True):
    """Run ip(8); the completed process."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def in_ns(ns, *argv, check=False, timeout=30):
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check,
                          timeout=timeout)


def links(ns):
    """Link names in namespace ``ns``."""
    out = ip("-n", ns, "-o", "link", "show").stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def ping(ns, address):
    return in_ns(ns, "busybox", "ping", "-c", "1", "-W", "2", address).returncode == 0


def tcp_hello(ns, address, port):
    """What the TCP server at address:port answers to a client in ``ns`` ('' when unreachable)."""
    result = in_ns(ns, sys.executable, "-c", TCP_CLIENT, address, str(port), timeout=15)
    return result.stdout.strip()


class Lab:
    """Namespaces for hypervisors, the outside and guests; cleanup() removes every one."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces = []
        self.processes = []
        # Where dnsmasq, unprivileged, can enter (pytest's own tmp directories are private).
        self.state_dir = tempfile.mkdtemp(prefix="sct-state-", dir="/run")
        os.chmod(self.state_dir, 0o755)
        self.prefix = "sct%s-" % self.tag

    def netns(self, role):
        name = "sct-%s-%s" % (role, self.tag)
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a, name_a, ns_b, name_b, addr_a=None, addr_b=None, mac_b=None):
        """A veth between two namespaces, both ends up, optionally addressed."""
        tmp_a, tmp_b = "t%sa" % uuid.uuid4().hex[:8], "t%sb" % uuid.uuid4().hex[:8]
        ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        ip("link", "set", tmp_a, "netns", ns_a, "name", name_a)
        ip("link", "set", tmp_b, "netns", ns_b, "name", name_b)
        if mac_b:
            ip("-n", ns_b, "link", "set", name_b, "address", mac_b)
        for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            if addr:
                ip("-n", ns, "addr", "add", addr, "dev", name)
            ip("-n", ns, "link", "set", name, "up")

    def hypervisor(self, role="hv", underlay_ip="10.99.0.1/24"):
        """A hypervisor namespace with an underlay interface ul0 (its peer dangles unless joined)."""
        ns = self.netns(role)
        if underlay_ip:
            self.veth(ns, "ul0", ns, "ul0p", underlay_ip)
        return ns

    def join_underlay(self, hv_a, hv_b):
        """Two hypervisors whose ul0 are the two ends of one veth (10.99.0.1 and .2)."""
        for hv in (hv_a, hv_b):
            ip("-n", hv, "link", "del", "ul0", check=False)
        self.veth(hv_a, "ul0", hv_b, "ul0", "10.99.0.1/24", "10.99.0.2/24")

    def outside(self, hv):
        """The 'internet' namespace, linked to ``hv``'s uplink, routing the pool back to ``hv``."""
        out = self.netns("out")
        self.veth(hv, "up0", out, "eth0", UPLINK_IP + "/24", OUTSIDE_IP + "/24")
        ip("-n", hv, "route", "add", "default", "via", OUTSIDE_IP)
        ip("-n", out, "route", "add", POOL, "via", UPLINK_IP)
        return out

    def tcp_server(self, ns, port=8080):
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", TCP_SERVER, str(port)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        self.processes.append(proc)
        return proc

    def guest(self, hv, bridge, mac, name="g"):
        """A guest namespace with eth0 (``mac``) plugged into ``bridge`` on ``hv``."""
        ns = self.netns(name)
        port = "gp%s" % uuid.uuid4().hex[:6]
        self.veth(hv, port, ns, "eth0", mac_b=mac)
        ip("-n", hv, "link", "set", port, "master", bridge)
        return ns

    def dhcp(self, guest):
        """Run udhcpc in ``guest``; the lease as 'ip mask router mtu' ('' when none came)."""
        script = self.tmp / "udhcpc.sh"
        if not script.exists():
            script.write_text(UDHCPC_SCRIPT)
            script.chmod(0o755)
        lease = self.tmp / ("lease-%s" % guest)
        result = subprocess.run(
            ["ip", "netns", "exec", guest, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1",
             "-s", str(script)], capture_output=True, text=True, env=dict(os.environ, LEASE_FILE=str(lease)),
            timeout=60, check=False)
        return lease.read_text().strip() if lease.exists() else result.stderr

    def cleanup(self):
        for proc in self.processes:
            proc.kill()
            proc.wait()
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def lab_context(tmp_path):
    """A Lab, cleaned up afterwards; no namespace with its prefix may survive."""
    lab = Lab(tmp_path)
    yield lab
    lab.cleanup()
    # Gateway namespaces the module made carry our prefix; none may survive a test.
    leftovers = [ns for ns in netns_list() if ns.startswith(lab.prefix)]
    for ns in leftovers:
        delete_netns(ns)
    assert not leftovers, "namespaces left behind: %s" % leftovers


# Other test files make the same fixture from lab_context (importing a fixture object shadows it).
lab_fixture = pytest.fixture(lab_context, name="lab")


def network_args(etcd, lab, hv, **extra):
    args = dict(etcd.module_args, name="net1", cidr="10.10.0.0/24", underlay_interface="ul0", host_netns=hv,
                namespace_prefix=lab.prefix, state_dir=lab.state_dir)
    args.update(extra)
    return args


def store_for(etcd):
    """A Store on the test's private prefix (for instance records and allocations)."""
    from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

    return Store.from_params(etcd.module_args)


def add_instance(store, name, network, mac, cidr):
    address = store.allocate_ip(network, cidr, "instance/%s" % name)
    store.put("instances/%s" % name, {"name": name, "interfaces": [{"network": network, "mac": mac, "ip": address}]})
    return address


def nft_tables(ns):
    return in_ns(ns, "nft", "list", "tables").stdout


def test_one_host_lifecycle(ansible, etcd, lab):
    hv = lab.hypervisor()
    outside = lab.outside(hv)
    lab.tcp_server(outside)
    args = network_args(etcd, lab, hv, nat=True, egress_pool=POOL, dns_servers=["192.0.2.53"])
    links_before = links(hv)

    checked = ansible.run_module("network", args, check=True, diff=True)
    assert checked["changed"] is True, checked
    assert links(hv) == links_before and etcd.key_count() == 0  # check mode changed nothing
    assert checked["diff"]["after"]["record"]["cidr"] == "10.10.0.0/24"

    applied = ansible.run_module("network", args, diff=True)
    assert applied["changed"] is True, applied
    vni, bridge, ns = applied["vni"], applied["bridge"], applied["namespace"]
    assert bridge == "br-%x" % vni and ns == lab.prefix + "%x" % vni
    assert applied["gateway_ip"] == "10.10.0.1" and applied["dhcp_range"] == "10.10.0.2-10.10.0.254"
    assert applied["mtu"] == 1450 and applied["diff"]["before"]["vni"] is None
    assert {"vx-%x" % vni, bridge, "vg-%x" % vni, "ve-%x" % vni} <= set(links(hv))
    assert "table ip smallcloud" in nft_tables(ns)

    again = ansible.run_module("network", args)
    assert again["changed"] is False, again["actions"]

    # A guest recorded in etcd gets its lease (dnsmasq reloaded), reaches the gateway and the outside via NAT.
    store = store_for(etcd)
    mac = "02:73:63:00:00:11"
    address = add_instance(store, "vm1", "net1", mac, "10.10.0.0/24")
    leases = ansible.run_module("network", args, diff=True)
    assert "reload dnsmasq leases and names (SIGHUP)" in leases["actions"], leases["actions"]
    assert address in leases["diff"]["after"]["leases"]
    guest = lab.guest(hv, bridge, mac)
    assert lab.dhcp(guest) == "%s 24 10.10.0.1 1450" % address
    assert ping(guest, "10.10.0.1")
    assert tcp_hello(guest, OUTSIDE_IP, 8080) == "hello %s" % applied["egress_address"]

    # Drift: a deleted VXLAN, a killed dnsmasq and a dropped nft table are repaired and reported.
    ip("-n", hv, "link", "del", "vx-%x" % vni)
    pid = int(open(os.path.join(lab.state_dir, ns, "dnsmasq.pid")).read())
    # Issue 15: dnsmasq answers the guests unprivileged (and still re-read the hosts file above).
    uid = next(line.split()[1] for line in open("/proc/%d/status" % pid) if line.startswith("Uid:"))
    assert int(uid) == pwd.getpwnam("dnsmasq").pw_uid
    os.kill(pid, 9)
    in_ns(ns, "nft", "delete", "table", "ip", "smallcloud", check=True)
    # The host's fence (issue 15) is there, and a deleted one comes back.
    assert in_ns(hv, "nft", "list", "table", "inet", "smallcloud_fence").returncode == 0
    in_ns(hv, "nft", "delete", "table", "inet", "smallcloud_fence", check=True)
    repaired = ansible.run_module("network", args)
    assert repaired["changed"] is True
    text = "\n".join(repaired["actions"])
    assert "create VXLAN vx-%x" % vni in text and "start dnsmasq" in text and "write nft table" in text, text
    assert "write nft table inet smallcloud_fence" in text, text
    assert ansible.run_module("network", args)["changed"] is False
    assert tcp_hello(guest, OUTSIDE_IP, 8080) == "hello %s" % applied["egress_address"]

    # Absent is refused while an instance is attached, then removes everything.
    absent = dict(args, state="absent")
    refused = ansible.run_module("network", absent)
    assert refused["failed"] and "vm1" in refused["msg"]
    store.delete("instances/vm1")
    store.release_ip("net1", address)
    assert ansible.run_module("network", absent, check=True)["changed"] is True
    assert ns in netns_list()
    removed = ansible.run_module("network", absent, diff=True)
    assert removed["changed"] is True and removed["diff"]["after"]["record"] is None
    assert ns not in netns_list()
    assert not [name for name in links(hv) if name.endswith("-%x" % vni)]
    assert in_ns(hv, "nft", "list", "tables").stdout == ""  # the fence went with the last network
    assert not os.path.exists(os.path.join(lab.state_dir, ns))
    assert etcd.key_count() == 0, store.list("")
    assert ansible.run_module("network", absent)["changed"] is False


def wait_until(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# Pure validation (CIDR syntax, ranges, names) is covered in tests/unit/test_networks.py.
BAD_INPUTS = [
    ({"cidr": "10.30.0.1/24"}, "10.30.0.1/24"),
    ({"cidr": "10.0.0.0/8"}, "overlaps network net1"),
    ({"vni": 0x4242}, "taken by network/net1"),
    ({"name": "bad name!"}, "bad name!"),
    ({"underlay_interface": "nope0"}, "nope0"),
    ({"mtu": 1460}, "at most 1450"),
    ({"nat": True}, "egress_pool"),
    ({"nat": True, "egress_pool": "192.0.2.0/30"}, "192.0.2.0/30"),
    ({"nat": True, "egress_pool": POOL, "egress_address": "198.51.100.7"}, "198.51.100.7"),
]


def test_bad_input_fails_clearly_and_allocates_nothing(ansible, etcd, lab):
    hv = lab.hypervisor()
    existing = ansible.run_module("network", network_args(etcd, lab, hv, vni=0x4242, dhcp=False))
    assert existing["changed"] is True, existing
    store = store_for(etcd)
    # Exhaust the /30 pool: its one assignable address is taken.
    store.allocate_floating("192.0.2.0/30", "someone")

    def ours():
        return [name for name in netns_list() if lab.tag in name]  # other people's tests make namespaces too

    keys, hv_links, namespaces = store.list(""), links(hv), ours()
    tasks = []
    for override, _expected in BAD_INPUTS:
        args = network_args(etcd, lab, hv, **{"name": "net2", "cidr": "10.30.0.0/24", **override})
        tasks.append({"name": str(override), "smallcloud.kvm.network": args, "ignore_errors": True})
    run = ansible.run_tasks(tasks)
    results = run.results()
    assert len(results) == len(BAD_INPUTS), run.stdout[-2000:]
    for (override, expected), result in zip(BAD_INPUTS, results):
        assert result.get("failed") is True, (override, result)
        assert expected in result["msg"], (override, result["msg"])
    # Nothing created or allocated: same keys, links and namespaces as before.
    assert store.list("") == keys
    assert links(hv) == hv_links and ours() == namespaces
    store.release_floating("192.0.2.0/30", "192.0.2.2")
    assert ansible.run_module("network", network_args(etcd, lab, hv, state="absent"))["changed"] is True
    assert etcd.key_count() == 0


def fdb_dsts(hv, vxlan):
    out = subprocess.run(["bridge", "-n", hv, "fdb", "show", "dev", vxlan], capture_output=True, text=True,
                         check=True).stdout
    return sorted(line.split(" dst ")[1].split()[0] for line in out.splitlines()
                  if line.startswith("00:00:00:00:00:00") and " dst " in line)


def test_two_hosts_over_vxlan_and_isolated_networks(ansible, etcd, lab):
    hv1, hv2 = lab.hypervisor("hv1", None), lab.hypervisor("hv2", None)
    lab.join_underlay(hv1, hv2)
    outside = lab.outside(hv1)
    lab.tcp_server(outside)
    store = store_for(etcd)
    macs = {"g1": "02:73:63:00:01:01", "g2": "02:73:63:00:01:02", "g3": "02:73:63:00:02:01"}
    ips = {"g1": add_instance(store, "g1", "net1", macs["g1"], "10.10.0.0/24"),
           "g2": add_instance(store, "g2", "net1", macs["g2"], "10.10.0.0/24"),
           "g3": add_instance(store, "g3", "net2", macs["g3"], "10.20.0.0/24")}
    nat = dict(nat=True, egress_pool=POOL)
    net1_hv1 = network_args(etcd, lab, hv1, **nat)
    net1_hv2 = network_args(etcd, lab, hv2, gateway=False)
    net2_hv1 = network_args(etcd, lab, hv1, name="net2", cidr="10.20.0.0/24", **nat)
    tasks = [{"name": "net1 on hv1", "smallcloud.kvm.network": net1_hv1},
             {"name": "net1 on hv2", "smallcloud.kvm.network": net1_hv2},
             {"name": "net1 on hv1 again: peers from etcd", "smallcloud.kvm.network": net1_hv1},
             {"name": "net2 on hv1", "smallcloud.kvm.network": net2_hv1}]
    one, two, three, four = ansible.run_tasks(tasks).results()
    assert not any(result.get("failed") for result in (one, two, three, four)), (one, two, three, four)
    vni = one["vni"]
    vxlan = "vx-%x" % vni
    assert two["vni"] == vni and two["namespace"] is None and two["peers"] == ["10.99.0.1"]
    assert "add peer 10.99.0.2 to %s" % vxlan in three["actions"] and three["peers"] == ["10.99.0.2"]
    # Head-end replication to the peer only, never to the host itself.
    assert fdb_dsts(hv1, vxlan) == ["10.99.0.2"] and fdb_dsts(hv2, vxlan) == ["10.99.0.1"]

    g1, g2 = lab.guest(hv1, one["bridge"], macs["g1"], "g1"), lab.guest(hv2, two["bridge"], macs["g2"], "g2")
    g3 = lab.guest(hv1, four["bridge"], macs["g3"], "g3")
    # g2 is on hv2: its DHCP exchange with the gateway on hv1 crosses the VXLAN.
    assert lab.dhcp(g1).split()[0] == ips["g1"]
    assert lab.dhcp(g2).split()[0] == ips["g2"]
    assert lab.dhcp(g3).split()[0] == ips["g3"]
    assert ping(g1, ips["g2"]) and ping(g2, ips["g1"])
    assert tcp_hello(g2, OUTSIDE_IP, 8080) == "hello %s" % one["egress_address"]
    # Isolation: net2's guest reaches the outside but neither net1's guests nor its gateway
    # (net1's egress address is an outside address, public by design).
    assert tcp_hello(g3, OUTSIDE_IP, 8080) == "hello %s" % four["egress_address"]
    for target in (ips["g1"], ips["g2"], "10.10.0.1"):
        assert not ping(g3, target), target
    assert not ping(g1, ips["g3"])

    # hv2 leaves; hv1 drops its FDB entry on the next run.
    for name in ("g1", "g2", "g3"):
        store.delete("instances/%s" % name)
    teardown = ansible.run_tasks([
        {"name": "net1 off hv2", "smallcloud.kvm.network": dict(net1_hv2, state="absent")},
        {"name": "hv1 follows", "smallcloud.kvm.network": net1_hv1},
        {"name": "net1 off hv1", "smallcloud.kvm.network": dict(net1_hv1, state="absent")},
        {"name": "net2 off hv1", "smallcloud.kvm.network": dict(net2_hv1, state="absent")},
    ]).results()
    assert len(teardown) == 4 and not teardown[-1].get("failed"), teardown[-1].get("msg")
    left, pruned, gone1, gone2 = teardown
    assert left["changed"] and vxlan not in links(hv2), left
    assert "remove peer 10.99.0.2 from %s" % vxlan in pruned["actions"], pruned
    assert gone1["changed"] and gone2["changed"]
    assert not [name for name in links(hv1) if name.startswith(("vx-", "br-", "vg-", "ve-"))]
    assert etcd.key_count() == 0, store.list("")
