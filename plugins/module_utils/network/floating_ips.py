# -*- coding: utf-8 -*-
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``floating_ip`` module.

A floating IP is an address of an outside pool mapped one-to-one onto a guest's fixed address, on the
network's gateway host: a DNAT rule (chain ``floating_dnat``) and an SNAT rule (chain ``floating_snat``)
in the namespace's ``table ip smallcloud``, the address on the namespace's ``wan`` (so it answers ARP
from the host) and a host route to it through ``ve-<vni hex>``.

etcd: the allocation ``floating/POOL/ADDRESS`` (owner ``floating_ip:NETWORK/TARGET``) and the record
``floating_ips/ADDRESS`` = ``{"address", "pool", "network", "instance", "fixed_ip"}``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.networks import (
    WAN,
    Handles,
    check_name,
    check_pool_address,
    device_names,
    parse_address,
    parse_cidr,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

FLOATING_ARGS = dict(
    pool=dict(type="str"),
    network=dict(type="str"),
    instance=dict(type="str"),
    fixed_ip=dict(type="str"),
    address=dict(type="str"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    prune=dict(type="bool", default=False),
    host_netns=dict(type="str"),
    namespace_prefix=dict(type="str", default="scnet-"),
)
MUTUALLY_EXCLUSIVE = [("instance", "fixed_ip")]


def dnat_comment(address, fixed_ip):
    """The comment naming a floating IP's DNAT rule (observation compares comments)."""
    return "fip %s -> %s" % (address, fixed_ip)


def snat_comment(address, fixed_ip):
    """The comment naming a floating IP's SNAT rule."""
    return "fip %s <- %s" % (address, fixed_ip)


def owner_of(network, target):
    """The allocation owner of the floating IP of ``target`` (instance name or fixed IP) on ``network``."""
    return "floating_ip:%s/%s" % (network, target)


def validate(params):
    """Checks that need neither etcd nor the host; returns the parsed pool (or None)."""
    pool = parse_cidr(params["pool"], "pool", max_prefixlen=30) if params["pool"] else None
    if params["prune"]:
        return pool
    if params["address"]:
        address = parse_address(params["address"], "address")
        if pool is not None:
            check_pool_address(pool, address, "address")
    if params["state"] == "present":
        for option in ("pool", "network"):
            if not params[option]:
                raise InvalidInput("%s is required with state=present" % option)
        if not (params["instance"] or params["fixed_ip"]):
            raise InvalidInput("one of instance or fixed_ip is required with state=present")
    if params["network"]:
        check_name(params["network"])
    if params["fixed_ip"]:
        parse_address(params["fixed_ip"], "fixed_ip")
    return pool


def converge(module):
    """Entry point for run_module."""
    params = module.params
    pool = validate(params)
    store = Store.from_params(params)
    handles = Handles()
    try:
        runner = FloatingRunner(module, store, handles, pool)
        if params["prune"]:
            with store.lock("floating-prune", ttl=60, timeout=120):
                return runner.prune()
        network = params["network"] or runner.network_of_address()
        if network is None:
            return runner.plan.result(address=params["address"])  # absent, never existed: nothing to do
        with store.lock("network/%s" % network, ttl=60, timeout=120):
            if params["state"] == "absent":
                return runner.absent(network)
            return runner.present(network)
    finally:
        handles.close()


class FloatingRunner(object):
    """One converge of one floating IP (or one prune) on the network's gateway host."""

    def __init__(self, module, store, handles, pool):
        self.module = module
        self.params = module.params
        self.store = store
        self.handles = handles
        self.pool = str(pool) if pool is not None else None
        self.plan = Plan()

    def network_of_address(self):
        """The network of the floating IP recorded for ``address`` (None when there is none)."""
        if not self.params["address"]:
            return None
        record = self.store.get("floating_ips/%s" % self.params["address"])
        return record.get("network") if record else None

    # present -----------------------------------------------------------------------------------

    def present(self, network_name):
        """Allocate (or reuse) the address and converge rules, address and route."""
        network = self.store.get("networks/%s" % network_name)
        if network is None:
            raise InvalidInput("network %s does not exist" % network_name, network=network_name)
        if not network.get("nat"):
            raise InvalidInput("network %s has no egress (nat: false); floating IPs need nat" % network_name,
                               network=network_name)
        fixed_ip, target = self.fixed_ip(network)
        names = device_names(network["vni"], self.params["namespace_prefix"])
        if not svc.netns_exists(names["namespace"]):
            raise InvalidInput("network %s has no gateway namespace %s on this host; run floating_ip on its "
                               "gateway host (%s)" % (network_name, names["namespace"], network.get("gateway_vtep")),
                               network=network_name)
        record = self.existing(network_name, target)
        address = self.params["address"] or (record or {}).get("address")
        owner = owner_of(network_name, target)
        if address is None:
            self.plan.add("allocate a floating IP from %s" % self.params["pool"])
            if self.module.check_mode:
                return self.plan.result(address=None, fixed_ip=fixed_ip, network=network_name)
            address = self.store.allocate_floating(self.params["pool"], owner)
        elif record is None:
            self.plan.add("allocate floating IP %s" % address)
            if not self.module.check_mode:
                self.store.allocate_floating(self.params["pool"], owner, requested=address)
        want = {"address": address, "pool": self.pool, "network": network_name,
                "instance": self.params["instance"], "fixed_ip": fixed_ip}
        current = self.store.get("floating_ips/%s" % address)
        if self.plan.compare("record", current, want):
            self.plan.add("record floating_ips/%s" % address, self.store.put, "floating_ips/%s" % address, want)
        self.host_steps(names, address, fixed_ip)
        self.plan.apply(self.module.check_mode)
        return self.plan.result(address=address, fixed_ip=fixed_ip, network=network_name,
                                namespace=names["namespace"], pool=self.pool)

    def fixed_ip(self, network):
        """(fixed IP, target name) from ``fixed_ip`` or from the instance's record on the network."""
        cidr = ipaddress.ip_network(u"%s" % network["cidr"])
        if self.params["fixed_ip"]:
            if ipaddress.ip_address(u"%s" % self.params["fixed_ip"]) not in cidr:
                raise InvalidInput("fixed_ip %s is not in network %s (%s)" % (self.params["fixed_ip"], network["name"],
                                   cidr), fixed_ip=self.params["fixed_ip"])
            return self.params["fixed_ip"], self.params["fixed_ip"]
        instance = self.store.get("instances/%s" % self.params["instance"])
        for nic in (instance or {}).get("interfaces") or []:
            if nic.get("network") == network["name"] and nic.get("ip"):
                return nic["ip"], self.params["instance"]
        raise InvalidInput("instance %s has no address on network %s" % (self.params["instance"], network["name"]),
                           instance=self.params["instance"])

    def existing(self, network_name, target):
        """The floating IP record already held by ``target`` on the network (address given or not)."""
        if self.params["address"]:
            record = self.store.get("floating_ips/%s" % self.params["address"])
            if record and (record.get("network"), record.get("instance") or record.get("fixed_ip")) != (
                    network_name, target):
                raise Conflict("floating IP %s is attached to %s on network %s"
                               % (self.params["address"], record.get("instance") or record.get("fixed_ip"),
                                  record.get("network")), address=self.params["address"])
            return record
        for record in self.store.list("floating_ips").values():
            if record.get("network") == network_name and target in (record.get("instance"), record.get("fixed_ip")) \
                    and record.get("pool") == self.pool:
                return record
        return None

    def host_steps(self, names, address, fixed_ip):
        """DNAT/SNAT rules, the address on wan and the host route, each checked and fixed separately."""
        ns = names["namespace"]
        inner = self.handles.get(ns)
        host = self.handles.get(self.params["host_netns"])
        dnat = svc.nft_rule_handles(ns, svc.FLOATING_DNAT)
        snat = svc.nft_rule_handles(ns, svc.FLOATING_SNAT)
        wanted = {
            svc.FLOATING_DNAT: (dnat_comment(address, fixed_ip), "ip daddr %s dnat to %s" % (address, fixed_ip), dnat),
            svc.FLOATING_SNAT: (snat_comment(address, fixed_ip),
                                'oifname "%s" ip saddr %s snat to %s' % (WAN, fixed_ip, address), snat),
        }
        self.plan.compare("rules", sorted(c for c in list(dnat) + list(snat) if c.startswith("fip %s " % address)),
                          sorted(spec[0] for spec in wanted.values()))
        for chain, (comment, body, observed) in sorted(wanted.items()):
            self.stale_rules(ns, chain, observed, address, keep=comment)
            if comment not in observed:
                script = 'add rule ip %s %s %s comment "%s"\n' % (svc.NFT_TABLE, chain, body, comment)
                self.plan.add("add %s rule: %s" % (chain, comment), svc.nft_apply, ns, script)
        addresses = inner.addresses(WAN)
        self.plan.compare("addresses", addresses, sorted(set(addresses) | set(["%s/32" % address])))
        if "%s/32" % address not in addresses:
            self.plan.add("add %s/32 to %s:%s" % (address, ns, WAN), inner.add_address, WAN, "%s/32" % address)
        if ("%s/32" % address, None, names["wan_host"]) not in host.routes():
            self.plan.add("add route %s/32 dev %s" % (address, names["wan_host"]), host.add_route,
                          "%s/32" % address, names["wan_host"])

    def stale_rules(self, ns, chain, observed, address, keep=None):
        """Queue removal of rules of ``address`` in ``chain`` other than ``keep``."""
        for comment, handles in sorted(observed.items()):
            if comment.startswith("fip %s " % address) and comment != keep:
                script = "".join("delete rule ip %s %s handle %d\n" % (svc.NFT_TABLE, chain, h) for h in handles)
                self.plan.add("delete %s rule: %s" % (chain, comment), svc.nft_apply, ns, script)

    # absent and prune --------------------------------------------------------------------------

    def absent(self, network_name):
        """Release the floating IP named by address or by network + target; a gone one is fine."""
        record = None
        if self.params["address"]:
            record = self.store.get("floating_ips/%s" % self.params["address"])
        elif self.params["instance"] or self.params["fixed_ip"]:
            target = self.params["instance"] or self.params["fixed_ip"]
            for candidate in self.store.list("floating_ips").values():
                if candidate.get("network") == network_name and target in (candidate.get("instance"),
                                                                           candidate.get("fixed_ip")):
                    record = candidate
        if record is None:
            return self.plan.result(address=self.params["address"], network=network_name)
        self.release(record)
        self.plan.apply(self.module.check_mode)
        return self.plan.result(address=record["address"], network=network_name, fixed_ip=record["fixed_ip"])

    def release(self, record):
        """Queue removal of a floating IP's rules, address and route (where present) and its etcd keys."""
        address = record["address"]
        network = self.store.get("networks/%s" % record["network"])
        if network is not None:
            names = device_names(network["vni"], self.params["namespace_prefix"])
            if svc.netns_exists(names["namespace"]):
                self.host_cleanup(names, address)
        self.plan.compare("record", record, None)
        self.plan.add("release floating IP %s to %s" % (address, record["pool"]), self.store.release_floating,
                      record["pool"], address)
        self.plan.add("delete floating_ips/%s" % address, self.store.delete, "floating_ips/%s" % address)

    def host_cleanup(self, names, address):
        """Queue removal of the rules, the wan address and the host route of ``address``."""
        ns = names["namespace"]
        for chain in (svc.FLOATING_DNAT, svc.FLOATING_SNAT):
            self.stale_rules(ns, chain, svc.nft_rule_handles(ns, chain), address)
        inner = self.handles.get(ns)
        if "%s/32" % address in inner.addresses(WAN):
            self.plan.add("remove %s/32 from %s:%s" % (address, ns, WAN), inner.del_address, WAN, "%s/32" % address)
        host = self.handles.get(self.params["host_netns"])
        if ("%s/32" % address, None, names["wan_host"]) in host.routes():
            self.plan.add("remove route %s/32 dev %s" % (address, names["wan_host"]), host.del_route,
                          "%s/32" % address, names["wan_host"])

    def prune(self):
        """Release every floating IP whose network or instance no longer exists (or lost that network)."""
        networks = self.store.list("networks")
        instances = self.store.list("instances")
        pruned = []
        for address, record in sorted(self.store.list("floating_ips").items()):
            if "/" in address or not isinstance(record, dict):
                continue
            if self.pool and record.get("pool") != self.pool:
                continue
            if self.orphaned(record, networks, instances):
                pruned.append(address)
                self.release_now(record)
        return self.plan.result(pruned=pruned)

    def release_now(self, record):
        """Release one orphan under its network's lock, reporting its steps on the main plan."""
        main, self.plan = self.plan, Plan()
        try:
            with self.store.lock("network/%s" % record["network"], ttl=60, timeout=120):
                self.release(record)
                self.plan.apply(self.module.check_mode)
        finally:
            for action in self.plan.actions:
                main.add(action)
            main.before.setdefault("floating_ips", []).append(record)
            main.after.setdefault("floating_ips", [])
            self.plan = main

    @staticmethod
    def orphaned(record, networks, instances):
        """True when the record's network is gone, or its instance is gone or off that network."""
        if record.get("network") not in networks:
            return True
        if not record.get("instance"):
            return False
        instance = instances.get(record["instance"])
        return not instance or not any(nic.get("network") == record["network"] and nic.get("ip") == record["fixed_ip"]
                                       for nic in instance.get("interfaces") or [])
