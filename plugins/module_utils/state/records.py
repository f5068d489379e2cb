# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Typed access to the cloud's records, so no runner builds a key path by hand.

    networks/NAME         a network          instances/NAME      an instance
    floating_ips/ADDRESS  a floating IP      ipam/NETWORK/IP     an address allocation
    vni/VNI               a VNI allocation   hosts/NAME          a hypervisor (its underlay, virt type)
    security_groups/NAME  a security group (its rules)
"""

NETWORKS, INSTANCES, FLOATING_IPS, HOSTS = "networks", "instances", "floating_ips", "hosts"
SECURITY_GROUPS = "security_groups"


def network_key(name):
    return "%s/%s" % (NETWORKS, name)


def instance_key(name):
    return "%s/%s" % (INSTANCES, name)


def floating_ip_key(address):
    return "%s/%s" % (FLOATING_IPS, address)


def host_key(name):
    return "%s/%s" % (HOSTS, name)


def security_group_key(name):
    return "%s/%s" % (SECURITY_GROUPS, name)


def ipam_key(network, address):
    return "ipam/%s/%s" % (network, address)


def ipam_folder(network):
    """The folder of a network's address allocations."""
    return "ipam/%s" % network


def vni_key(vni):
    return "vni/%d" % vni


def top_records(listing):
    """Only the direct children of a ``Store.list`` answer (nested keys belong to other records)."""
    return {key: value for key, value in (listing or {}).items() if "/" not in key.strip("/")}


def networks(store):
    """``{name: record}`` of every network."""
    return top_records(store.list(NETWORKS))


def instances(store):
    """``{name: record}`` of every instance."""
    return top_records(store.list(INSTANCES))


def floating_ips(store):
    """``{address: record}`` of every floating IP."""
    return top_records(store.list(FLOATING_IPS))


def hosts(store):
    """``{name: record}`` of every registered hypervisor."""
    return top_records(store.list(HOSTS))


def security_groups(store):
    """``{name: record}`` of every security group."""
    return top_records(store.list(SECURITY_GROUPS))


def floating_of(name, interfaces, floating_ips):
    """The floating addresses (sorted) of a ``floating_ips`` listing mapped onto instance ``name``: by name, or,
    when a record names no instance, by one of its ``interfaces``' fixed IPs on that network."""
    fixed = {(nic.get("network"), nic.get("ip")) for nic in interfaces}
    return sorted(address for address, fip in (floating_ips or {}).items() if isinstance(fip, dict)
                  and (fip.get("instance") == name
                  or (not fip.get("instance") and (fip.get("network"), fip.get("fixed_ip")) in fixed)))


def holder(store, key):
    """The owner of the allocation at ``key``, or None when the value is free."""
    taken = store.get(key)
    if taken is None:
        return None
    return taken.get("owner") if isinstance(taken, dict) else taken
