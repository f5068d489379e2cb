"""The floating_ip module on real namespaces, nftables and etcd, driven through Ansible."""

import pytest
from test_network import OUTSIDE_IP, POOL, add_instance, in_ns, lab_context, network_args, store_for, tcp_hello

pytestmark = pytest.mark.integration
lab_fixture = pytest.fixture(lab_context, name="lab")


def fip_rules(ns):
    return [line.strip() for line in in_ns(ns, "nft", "list", "table", "ip", "smallcloud").stdout.splitlines()
            if "fip " in line]


def words(output):
    """The whitespace-separated words of ip(8) output with any /prefix cut off: a released 192.0.2.2 must
    not be found in the egress address 192.0.2.29."""
    return {word.split("/")[0] for word in output.split()}


def test_floating_ip_lifecycle_and_prune(ansible, etcd, lab):
    hv = lab.hypervisor()
    outside = lab.outside(hv)
    lab.tcp_server(outside)
    store = store_for(etcd)
    mac = "02:73:63:00:03:01"
    fixed = add_instance(store, "vm1", "net1", mac, "10.10.0.0/24")
    net = ansible.run_module("network", network_args(etcd, lab, hv, nat=True, egress_pool=POOL))
    assert net["changed"] and not net.get("failed"), net
    ns = net["namespace"]
    guest = lab.guest(hv, net["bridge"], mac, "vm1")
    assert lab.dhcp(guest).split()[0] == fixed
    lab.tcp_server(guest, 9090)
    args = dict(etcd.module_args, pool=POOL, network="net1", instance="vm1", host_netns=hv,
                namespace_prefix=lab.prefix)

    checked = ansible.run_module("floating_ip", args, check=True, diff=True)
    assert checked["changed"] is True and checked["address"] is None, checked.get("msg")
    assert fip_rules(ns) == [] and store.list("floating_ips") == {}

    applied = ansible.run_module("floating_ip", args, diff=True)
    assert applied["changed"] is True and applied["fixed_ip"] == fixed, applied
    fip = applied["address"]
    assert applied["diff"]["after"]["record"]["address"] == fip
    # Reached from the outside on the floating address; the guest's own traffic leaves as that address.
    assert tcp_hello(outside, fip, 9090) == "hello %s" % OUTSIDE_IP
    assert tcp_hello(guest, OUTSIDE_IP, 8080) == "hello %s" % fip
    assert ansible.run_module("floating_ip", args)["changed"] is False
    # The network's own re-run leaves the floating address on wan: the two modules do not undo each other.
    again = ansible.run_module("network", network_args(etcd, lab, hv, nat=True, egress_pool=POOL))
    assert again["changed"] is False, again.get("actions")
    assert tcp_hello(outside, fip, 9090) == "hello %s" % OUTSIDE_IP

    # Drift: a missing DNAT rule is put back.
    handle = in_ns(ns, "nft", "-a", "list", "chain", "ip", "smallcloud", "floating_dnat").stdout
    handle = [line.split("# handle ")[1] for line in handle.splitlines() if "fip " in line][0]
    in_ns(ns, "nft", "delete", "rule", "ip", "smallcloud", "floating_dnat", "handle", handle, check=True)
    repaired = ansible.run_module("floating_ip", args)
    assert repaired["changed"] and any("floating_dnat" in action for action in repaired["actions"]), repaired
    assert tcp_hello(outside, fip, 9090) == "hello %s" % OUTSIDE_IP

    # Release: rules, address and route go, the address returns to the pool; a second release is a no-op.
    released = ansible.run_module("floating_ip", dict(etcd.module_args, address=fip, state="absent", host_netns=hv,
                                                      namespace_prefix=lab.prefix))
    assert released["changed"] is True, released.get("msg")
    assert fip_rules(ns) == [] and tcp_hello(outside, fip, 9090) == ""
    assert fip not in words(in_ns(ns, "ip", "-4", "-o", "addr", "show", "dev", "wan").stdout)
    assert fip not in words(in_ns(hv, "ip", "-4", "route").stdout)
    assert store.list("floating_ips") == {} and fip not in str(store.list("floating"))
    gone = ansible.run_module("floating_ip", dict(etcd.module_args, address=fip, state="absent"))
    assert gone["changed"] is False and not gone.get("failed"), gone

    # Prune: a floating IP whose instance was deleted is found and released; one for a fixed IP stays.
    orphan = ansible.run_module("floating_ip", args)
    by_ip = {key: value for key, value in args.items() if key != "instance"}
    kept = ansible.run_module("floating_ip", dict(by_ip, fixed_ip="10.10.0.200"))
    assert kept["changed"] and orphan["changed"], (orphan.get("msg"), kept.get("msg"))
    store.delete("instances/vm1")
    store.release_ip("net1", fixed)
    prune = dict(etcd.module_args, prune=True, host_netns=hv, namespace_prefix=lab.prefix)
    preview = ansible.run_module("floating_ip", prune, check=True)
    assert preview["pruned"] == [orphan["address"]] and len(store.list("floating_ips")) == 2
    pruned = ansible.run_module("floating_ip", prune)
    assert pruned["pruned"] == [orphan["address"]] and list(store.list("floating_ips")) == [kept["address"]]
    assert [rule for rule in fip_rules(ns) if orphan["address"] + " " in rule] == []

    # Bad input names the value and allocates nothing.
    keys = store.list("")
    bad = ansible.run_module("floating_ip", dict(args, address="203.0.113.9"))
    assert bad["failed"] and "203.0.113.9" in bad["msg"]
    assert store.list("") == keys

    ansible.run_module("floating_ip", dict(etcd.module_args, address=kept["address"], state="absent",
                                           host_netns=hv, namespace_prefix=lab.prefix))
    assert fip_rules(ns) == []
    removed = ansible.run_module("network", network_args(etcd, lab, hv, state="absent"))
    assert removed["changed"] and not removed.get("failed"), removed
    assert etcd.key_count() == 0, store.list("")
