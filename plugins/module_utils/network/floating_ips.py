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

import contextlib
import ipaddress

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import (
    ETCD_ARGS,
    HOST_NETNS_ARGS,
    NAMESPACE_ARGS,
    with_common,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan, resolved
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.addressing import (
    check_usable,
    parse_address,
    parse_cidr,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import WAN, Handles, device_names
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store, floating_folder

MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            pool=dict(type="str"),
            network=dict(type="str"),
            instance=dict(type="str"),
            fixed_ip=dict(type="str"),
            address=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            prune=dict(type="bool", default=False),
        ),
        ETCD_ARGS,
        HOST_NETNS_ARGS,
        NAMESPACE_ARGS,
    ),
    mutually_exclusive=[("instance", "fixed_ip")],
    supports_check_mode=True,
)


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
            check_usable(pool, address, "address")
    # Not required_if: with prune=true (state present by default) none of these is needed.
    if params["state"] == "present":
        for option in ("pool", "network"):
            if not params[option]:
                raise InvalidInput("%s is required with state=present" % option)
        if not (params["instance"] or params["fixed_ip"]):
            raise InvalidInput("one of instance or fixed_ip is required with state=present")
    if params["network"]:
        check_name("network", params["network"])
    if params["fixed_ip"]:
        parse_address(params["fixed_ip"], "fixed_ip")
    return pool


def run(module):
    """Entry point for run_module."""
    params = module.params
    pool = validate(params)
    store = Store.from_params(params)
    handles = Handles()
    try:
        runner = FloatingRunner(params, store, handles, pool)
        if params["prune"]:
            with store.lock("floating-prune", timeout=120):
                return runner.prune(module.check_mode)
        network = params["network"] or runner.network_of_address()
        if network is None:
            return runner.plan.result(address=params["address"])  # absent, never existed: nothing to do
        with store.lock("network/%s" % network, timeout=120):
            facts = runner.plan_absent(network) if params["state"] == "absent" else runner.plan_present(network)
            runner.plan.apply(module.check_mode)
            return runner.plan.result(**facts)
    finally:
        handles.close()


class FloatingRunner:
    """One converge of one floating IP (or one prune) on the network's gateway host."""

    def __init__(self, params, store, handles, pool):
        self.params = params
        self.store = store
        self.handles = handles
        self.pool = str(pool) if pool is not None else None
        self.plan = Plan()

    def network_of_address(self):
        """The network of the floating IP recorded for ``address`` (None when there is none)."""
        if not self.params["address"]:
            return None
        record = self.store.get(records.floating_ip_key(self.params["address"]))
        return record.get("network") if record else None

    # present -----------------------------------------------------------------------------------

    def plan_present(self, network_name):
        """Plan the allocation (or reuse) of the address, its record, rules, address and route; the facts."""
        network = self.store.get(records.network_key(network_name))
        if network is None:
            raise InvalidInput("network %s does not exist (known: %s)" % (
                network_name, ", ".join(sorted(records.networks(self.store))) or "none"), network=network_name)
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
        want = {"address": address, "pool": self.pool, "network": network_name,
                "instance": self.params["instance"], "fixed_ip": fixed_ip}
        if address is None or record is None:
            want["address"] = self.plan_allocation(owner_of(network_name, target), address)
        current = self.store.get(records.floating_ip_key(address)) if address else None
        if self.plan.compare("record", current, want):
            self.plan.add("record floating_ips/%s" % (address or "(allocated address)"), self.write_record,
                          want).undone_by(self.restore_record, want, current)
        if address is None:
            # The rules and routes name the address: planned once it is allocated.
            self.plan.expand("map the new floating IP onto %s in %s" % (fixed_ip, names["namespace"]),
                             lambda: self.host_plan(names, want["address"].value, fixed_ip))
        else:
            self.plan.merge(self.host_plan(names, address, fixed_ip))
        return dict(address=want["address"], fixed_ip=fixed_ip, network=network_name,
                    namespace=names["namespace"], pool=self.pool)

    def plan_allocation(self, owner, address):
        """A step allocating ``address`` (or any free one) of the pool for ``owner``; released if a later step fails."""
        pool = self.params["pool"]
        # Without an address of its own, the one a killed run allocated for this owner but never recorded.
        address = address or next(iter(self.store.held_by(floating_folder(pool), owner)), None)
        return self.plan.allocate(
            "allocate %s" % ("floating IP %s" % address if address else "a floating IP from %s" % pool),
            self.store.allocate_floating, pool, owner, requested=address,
            release=lambda value: self.store.release_floating(pool, value, owner=owner))

    def write_record(self, want):
        """Put the floating IP's record, its address filled in."""
        record = resolved(want)
        self.store.put(records.floating_ip_key(record["address"]), record)

    def restore_record(self, want, previous):
        """Undo of write_record: the previous record back, or none."""
        key = records.floating_ip_key(resolved(want)["address"])
        if previous is None:
            self.store.delete(key)
        else:
            self.store.put(key, previous)

    def fixed_ip(self, network):
        """(fixed IP, target name) from ``fixed_ip`` or from the instance's record on the network."""
        cidr = ipaddress.ip_network(network["cidr"])
        if self.params["fixed_ip"]:
            if ipaddress.ip_address(self.params["fixed_ip"]) not in cidr:
                raise InvalidInput("fixed_ip %s is not in network %s (%s)" % (self.params["fixed_ip"], network["name"],
                                   cidr), fixed_ip=self.params["fixed_ip"])
            return self.params["fixed_ip"], self.params["fixed_ip"]
        instance = self.store.get(records.instance_key(self.params["instance"]))
        for nic in (instance or {}).get("interfaces") or []:
            if nic.get("network") == network["name"] and nic.get("ip"):
                return nic["ip"], self.params["instance"]
        raise InvalidInput("instance %s has no address on network %s; name an instance recorded on it, or give "
                           "fixed_ip (an address of %s)" % (self.params["instance"], network["name"], cidr),
                           instance=self.params["instance"])

    def existing(self, network_name, target):
        """The floating IP record already held by ``target`` on the network (address given or not)."""
        if self.params["address"]:
            record = self.store.get(records.floating_ip_key(self.params["address"]))
            if record and (record.get("network"), record.get("instance") or record.get("fixed_ip")) != (
                    network_name, target):
                raise Conflict("floating IP %s is attached to %s on network %s"
                               % (self.params["address"], record.get("instance") or record.get("fixed_ip"),
                                  record.get("network")), address=self.params["address"])
            return record
        for record in records.floating_ips(self.store).values():
            if record.get("network") == network_name and target in (record.get("instance"), record.get("fixed_ip")) \
                    and record.get("pool") == self.pool:
                return record
        return None

    def host_plan(self, names, address, fixed_ip):
        """A plan for the DNAT/SNAT rules, the address on wan and the host route, each checked separately."""
        with self.planning_apart() as plan:
            self.host_steps(names, address, fixed_ip)
        return plan

    @contextlib.contextmanager
    def planning_apart(self):
        """The steps queued inside go to a plan of their own (yielded), not to the task's plan."""
        main, self.plan = self.plan, Plan()
        try:
            yield self.plan
        finally:
            self.plan = main

    def host_steps(self, names, address, fixed_ip):
        """Queue the DNAT/SNAT rules, the address on wan and the host route that are missing."""
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
        self.plan.compare("addresses", addresses, sorted(set(addresses) | {"%s/32" % address}))
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

    def plan_absent(self, network_name):
        """Plan the release of the floating IP named by address or by network + target; a gone one is fine."""
        record = None
        if self.params["address"]:
            record = self.store.get(records.floating_ip_key(self.params["address"]))
        elif self.params["instance"] or self.params["fixed_ip"]:
            target = self.params["instance"] or self.params["fixed_ip"]
            for candidate in records.floating_ips(self.store).values():
                if candidate.get("network") == network_name and target in (candidate.get("instance"),
                                                                           candidate.get("fixed_ip")):
                    record = candidate
        if record is None:
            return dict(address=self.params["address"], network=network_name)
        self.release(record)
        return dict(address=record["address"], network=network_name, fixed_ip=record["fixed_ip"])

    def release(self, record):
        """Queue removal of a floating IP's rules, address and route (where present) and its etcd keys."""
        address = record["address"]
        network = self.store.get(records.network_key(record["network"]))
        if network is not None:
            names = device_names(network["vni"], self.params["namespace_prefix"])
            if svc.netns_exists(names["namespace"]):
                self.host_cleanup(names, address)
        self.plan.compare("record", record, None)
        self.plan.add("release floating IP %s to %s" % (address, record["pool"]), self.store.release_floating,
                      record["pool"], address)
        self.plan.add("delete floating_ips/%s" % address, self.store.delete, records.floating_ip_key(address))

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

    def prune(self, check_mode):
        """Release every floating IP whose network or instance no longer exists (or lost that network).

        Each orphan is planned and released under its own network's lock, as its own plan, merged into the
        task's plan for the result.
        """
        networks = records.networks(self.store)
        instances = records.instances(self.store)
        orphans = []
        for _address, record in sorted(records.floating_ips(self.store).items()):
            if not isinstance(record, dict) or (self.pool and record.get("pool") != self.pool):
                continue
            if self.orphaned(record, networks, instances):
                orphans.append(record)
                self.plan.merge(self.release_under_lock(record, check_mode))
        self.plan.compare("floating_ips", orphans, [])
        return self.plan.result(pruned=[record["address"] for record in orphans])

    def release_under_lock(self, record, check_mode):
        """The applied plan releasing one orphan, planned and applied under its network's lock."""
        with self.planning_apart() as plan, self.store.lock("network/%s" % record["network"], timeout=120):
            self.release(record)
            plan.apply(check_mode)
        return plan

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
