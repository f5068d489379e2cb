# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``network`` module: validate, observe, plan, apply.

Per network and host: a unicast VXLAN ``vx-<vni hex>`` enslaved to bridge ``br-<vni hex>``, flooding to
each peer through an all-zero-MAC FDB entry. On the gateway host also a namespace ``<prefix><vni hex>``
joined to the bridge by veth ``vg-<hex>`` <-> ``lan`` (gateway address, dnsmasq) and, with ``nat``, to
the host by veth ``ve-<hex>`` <-> ``wan``: the namespace's egress address (from ``egress_pool``) sits on
``wan``, its default route points at ``169.254.0.1`` on ``ve-<hex>``, and the host routes the egress
address (and floating addresses) back to ``ve-<hex>``. The outside reaches the egress pool through
this host (a route on the uplink router). ``table ip smallcloud`` in the namespace does the NAT.

etcd record ``networks/NAME``::

    {"name", "cidr", "vni", "mtu", "dhcp", "dns_servers", "nat", "egress_pool", "egress_address",
     "vteps": [underlay addresses of hosts carrying it], "gateway_vtep": underlay address or null}

Instances attach through ``instances/NAME`` records:
``{"name": ..., "interfaces": [{"network": NAME, "mac": "02:73:63:..", "ip": "10.0.0.5"}], ...}``.
"""

import contextlib
import ipaddress
import os
import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import files
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import (
    ETCD_ARGS,
    HOST_NETNS_ARGS,
    NAMESPACE_ARGS,
    NETWORK_STATE_ARGS,
    with_common,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan, resolved, unresolved
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import fence
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.addressing import (
    VXLAN_OVERHEAD,
    check_usable,
    gateway_facts,
    parse_address,
    parse_cidr,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import (
    LAN,
    TRANSIT_HOST,
    WAN,
    Handles,
    check_namespace_prefix,
    device_names,
    gateway_state_dir,
    underlay_of,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.leases import attached_instances, gateway_files
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.allocators import check_vni
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store, floating_folder

MTU_MIN, MTU_MAX = 576, 9000

# The links of any network on a host (devices.device_names): with none left, the fence goes too.
NETWORK_LINK = re.compile(r"^(vx|br|vg|ve)-[0-9a-f]+$")

MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            cidr=dict(type="str"),
            vni=dict(type="int"),
            mtu=dict(type="int"),
            dhcp=dict(type="bool", default=True),
            dns=dict(type="bool", default=True),
            dns_servers=dict(type="list", elements="str", default=[]),
            nat=dict(type="bool", default=False),
            egress_pool=dict(type="str"),
            egress_address=dict(type="str"),
            gateway=dict(type="bool", default=True),
            underlay_interface=dict(type="str"),
            mesh_peers=dict(type="list", elements="str"),
            mesh_hosts=dict(type="list", elements="str"),
            departing_instances=dict(type="list", elements="str", default=[]),
        ),
        ETCD_ARGS,
        HOST_NETNS_ARGS,
        NAMESPACE_ARGS,
        NETWORK_STATE_ARGS,
    ),
    required_if=[("state", "present", ("cidr",))],
    mutually_exclusive=[("mesh_peers", "mesh_hosts")],
    supports_check_mode=True,
)


# pure validation -------------------------------------------------------------------------------


def validate_params(params):
    """Every check that needs neither etcd nor the host; returns parsed values."""
    check_name("network", params["name"])
    if params["vni"] is not None:
        check_vni(params["vni"])
    check_namespace_prefix(params["namespace_prefix"])
    parsed = {"network": None, "egress_pool": None}
    if params["state"] == "absent":
        return parsed
    parsed["network"] = parse_cidr(params["cidr"])
    for server in params["dns_servers"]:
        parse_address(server, "dns_servers")
    for peer in params["mesh_peers"] or []:
        parse_address(peer, "mesh_peers")
    if params["mtu"] is not None and not MTU_MIN <= params["mtu"] <= MTU_MAX:
        raise InvalidInput("mtu %d is out of range: allowed %d..%d" % (params["mtu"], MTU_MIN, MTU_MAX),
                           mtu=params["mtu"])
    if params["egress_pool"]:
        parsed["egress_pool"] = parse_cidr(params["egress_pool"], "egress_pool", max_prefixlen=30)
    if params["egress_address"]:
        address = parse_address(params["egress_address"], "egress_address")
        if parsed["egress_pool"] is None:
            raise InvalidInput("egress_address %s needs egress_pool (the pool it belongs to)"
                               % params["egress_address"], egress_address=params["egress_address"])
        check_usable(parsed["egress_pool"], address, "egress_address")
    return parsed


# the runner ------------------------------------------------------------------------------------


def run(module):
    """Entry point for run_module: the network's desired state planned, then applied (or previewed)."""
    params = module.params
    parsed = validate_params(params)
    if params["host_netns"] and not svc.netns_exists(params["host_netns"]):
        raise InvalidInput("host_netns %s does not exist" % params["host_netns"], host_netns=params["host_netns"])
    store = Store.from_params(params)
    handles = Handles()
    try:
        with store.lock("network/%s" % params["name"], timeout=120):
            runner = NetworkRunner(params, store, handles, parsed)
            with runner.creation_lock():
                facts = runner.plan_absent() if params["state"] == "absent" else runner.plan_present()
                runner.plan.apply(module.check_mode)
            return runner.plan.result(**facts())
    finally:
        handles.close()


class NetworkRunner:
    """One converge of one network on one host: ``plan_present`` or ``plan_absent`` fill ``plan`` and
    return a function giving the facts of the result (read after the apply)."""

    def __init__(self, params, store, handles, parsed):
        self.params = params
        self.store = store
        self.handles = handles
        self.parsed = parsed
        self.name = params["name"]
        self.path = records.network_key(self.name)
        self.owner = "network/%s" % self.name
        self.plan = Plan()
        self.host = handles.get(params["host_netns"])
        self.record = store.get(self.path)
        self.want = None  # the host's desired state, once the host plan is built
        self.underlay_name = params["underlay_interface"]  # filled from the default route by underlay()
        self.mesh = None  # with mesh_hosts: the VTEPs of those hosts, from their registrations
        self._registered = None

    def creation_lock(self):
        """The cloud-wide lock, held from planning to apply, when this run creates the network.

        So two new networks never overlap or share a VNI.
        """
        if self.record is not None or self.params["state"] == "absent":
            return contextlib.nullcontext()
        return self.store.lock("networks", timeout=120)

    # present -----------------------------------------------------------------------------------

    def plan_present(self):
        """Validate against etcd and the host; plan the record's creation or update, then the host."""
        self.record = self.store.get(self.path)  # again, now under the creation lock
        vtep, underlay_mtu = self.underlay()
        self.mesh = self.mesh_vteps(vtep)
        if self.record is None:
            record = self.plan_create(vtep, underlay_mtu)
        else:
            record = self.plan_update(self.record, vtep, underlay_mtu)
        if self.params["gateway"] and record.get("dhcp"):
            # Checked while planning, before the record is written (host_plan checks the gateway's directory too).
            svc.check_reachable_by_dnsmasq(os.path.join(self.params["state_dir"], self.params["namespace_prefix"]))
        if unresolved(record):
            # Device names and NAT rules derive from values allocated on apply: planned then.
            self.plan.expand("converge network %s on this host" % self.name, lambda: self.host_plan(record, vtep))
        else:
            self.plan.merge(self.host_plan(record, vtep))
        network = self.parsed["network"]

        def facts():
            if unresolved(record["vni"]):  # check mode of a new network
                return dict(vni=None, mtu=record["mtu"], **gateway_facts(network))
            # What the host plan was built from; worked out here only when its expansion did not run (check mode).
            want = self.want or self.desired(resolved(record), vtep)
            return dict(vni=want["vni"], bridge=want["bridge"], vxlan=want["vxlan"],
                        namespace=want["namespace"] if want["gateway"] else None, mtu=want["mtu"],
                        gateway_ip=want["gateway_ip"], dhcp_range=want["dhcp_range"], peers=want["peers"],
                        egress_address=want["egress"] if want["nat"] else None)

        return facts

    def host_plan(self, record, vtep):
        """A plan converging this host's part of the network described by ``record``."""
        plan = Plan()
        self.want = self.desired(resolved(record), vtep)
        HostPlan(self, plan, self.want).build()
        return plan

    def underlay(self):
        """(VTEP address, MTU) of the underlay: underlay_interface, else the default route's device."""
        self.underlay_name, address, mtu = underlay_of(self.host, self.params["underlay_interface"])
        return address, mtu

    def registered(self):
        """``{name: record}`` of the registered hypervisors, read once."""
        if self._registered is None:
            self._registered = records.hosts(self.store)
        return self._registered

    def mesh_vteps(self, vtep):
        """With ``mesh_hosts``: this host's VTEP and the underlay addresses of those hosts that are registered
        (``hosts/NAME``); None without. A host not registered yet carries no guest, so it is left out until
        it registers (the deploy playbook registers every hypervisor)."""
        names = self.params["mesh_hosts"]
        if names is None:
            return None
        registered = self.registered()
        vteps = {(registered.get(name) or {}).get("underlay_address") for name in names}
        return sorted((vteps - {None}) | {vtep})

    def carriers(self, record, vtep, joining):
        """The record's ``vteps`` with this host joining or leaving, limited to the mesh when there is one
        (a host gone for good leaves every record on the next converge of the others)."""
        vteps = set(record.get("vteps") or [])
        vteps = vteps | {vtep} if joining else vteps - {vtep}
        if self.mesh is not None:
            vteps &= set(self.mesh)
        return sorted(vteps)

    def check_unchanged(self, record):
        """Refuse changes an existing network cannot take (cidr, vni, a second gateway)."""
        if record["cidr"] != str(self.parsed["network"]):
            raise InvalidInput("network %s exists with cidr %s; cidr %s would need a new network"
                               % (self.name, record["cidr"], self.params["cidr"]), cidr=self.params["cidr"])
        if self.params["vni"] is not None and self.params["vni"] != record["vni"]:
            raise InvalidInput("network %s exists with vni %s; vni %s cannot be changed"
                               % (self.name, record["vni"], self.params["vni"]), vni=self.params["vni"])

    def check_new(self):
        """Checks against etcd for a network that does not exist yet: overlap, VNI taken."""
        network = self.parsed["network"]
        for key, other in records.networks(self.store).items():
            if isinstance(other, dict) and other.get("cidr") and other.get("name", key) != self.name:
                if network.overlaps(ipaddress.ip_network(other["cidr"])):
                    raise InvalidInput("cidr %s overlaps network %s (%s)" % (network, other.get("name", key),
                                       other["cidr"]), cidr=str(network), overlaps=other.get("name", key))
        vni = self.params["vni"]
        if vni is not None:
            holder = records.holder(self.store, records.vni_key(vni))
            if holder is not None and holder != self.owner:
                raise Conflict("vni %d is taken by %s" % (vni, holder), vni=vni, owner=holder)
        if self.params["nat"] and self.params["gateway"] and self.parsed["egress_pool"] is None:
            raise InvalidInput("nat needs egress_pool: the outside CIDR routed to this host that the "
                               "network's egress address comes from", name=self.name)

    def plan_create(self, vtep, underlay_mtu):
        """Plan the allocations and the record of a new network; a failed step releases what was allocated."""
        self.check_new()
        mtu = self.params["mtu"] or underlay_mtu - VXLAN_OVERHEAD
        self.check_mtu(mtu, underlay_mtu)
        record = self.base_record(mtu)
        record["vteps"] = [vtep]
        record["gateway_vtep"] = vtep if self.params["gateway"] else None
        vni = self.params["vni"] or self.left_over("vni")
        record["vni"] = self.plan.allocate(
            "allocate vni %s" % (vni or "from the pool"), self.store.allocate_vni, self.owner,
            requested=int(vni) if vni else None, release=lambda vni: self.store.release_vni(vni, owner=self.owner))
        if self.params["nat"]:
            record["egress_address"] = self.plan_egress_allocation(self.params["egress_pool"])
        self.plan.compare("vni", None, record["vni"])
        self.plan.compare("record", None, record)
        self.plan.add("create etcd record %s" % self.path, self.create_record, record)
        return record

    def plan_egress_allocation(self, pool):
        """A step allocating the egress address (the one asked for, or any) from ``pool``."""
        requested = self.params["egress_address"] or self.left_over(floating_folder(pool))
        return self.plan.allocate(
            "allocate egress address %s" % (requested or "from %s" % pool), self.store.allocate_floating, pool,
            self.owner, requested=requested,
            release=lambda address: self.store.release_floating(pool, address, owner=self.owner))

    def left_over(self, folder):
        """A value of allocation ``folder`` this network holds without a record naming it: a run killed before
        recording it left it, and this run takes it back instead of leaking it (None: there is none)."""
        held = self.store.held_by(folder, self.owner)
        return held[0] if held else None

    def create_record(self, record):
        """Write a new network's record with its allocations filled in."""
        if not self.store.create(self.path, resolved(record)):
            raise Conflict("network %s was created by someone else meanwhile" % self.name, name=self.name)

    def check_mtu(self, mtu, underlay_mtu):
        """Raise InvalidInput when ``mtu`` does not fit in the underlay with VXLAN's overhead."""
        if mtu > underlay_mtu - VXLAN_OVERHEAD:
            raise InvalidInput("mtu %d does not fit: underlay %s has mtu %d, so at most %d"
                               % (mtu, self.underlay_name, underlay_mtu,
                                  underlay_mtu - VXLAN_OVERHEAD), mtu=mtu)

    def base_record(self, mtu):
        """The record of a new network, before allocations."""
        return {
            "name": self.name, "cidr": str(self.parsed["network"]), "vni": None, "mtu": mtu,
            "dhcp": self.params["dhcp"], "dns": self.params["dns"], "dns_servers": self.params["dns_servers"],
            "nat": self.params["nat"],
            "egress_pool": self.params["egress_pool"], "egress_address": None, "vteps": [], "gateway_vtep": None,
        }

    def plan_update(self, record, vtep, underlay_mtu):
        """Settings from the options and this host's VTEP merged into the record; its update planned."""
        self.check_unchanged(record)
        if self.params["mtu"]:
            self.check_mtu(self.params["mtu"], underlay_mtu)
        if self.params["gateway"] and record.get("gateway_vtep") not in (None, vtep):
            raise Conflict("network %s already has its gateway on %s; set gateway=false on this host (%s)"
                           % (self.name, record["gateway_vtep"], vtep), gateway_vtep=record["gateway_vtep"])
        new = dict(record)
        if self.params["mtu"]:
            new["mtu"] = self.params["mtu"]
        new["vteps"] = self.carriers(record, vtep, joining=True)
        if self.params["gateway"]:
            new["gateway_vtep"] = vtep
            # Gateway services are configured where they run; other hosts only carry VXLAN + bridge.
            for key in ("dhcp", "dns", "dns_servers"):
                new[key] = self.params[key]
            self.plan_nat_change(record, new)
        elif record.get("gateway_vtep") == vtep:
            new["gateway_vtep"] = None
        if self.plan.compare("record", record, new):
            self.plan.add("update etcd record %s" % self.path, self.write_record, new)
        return new

    def write_record(self, record):
        self.store.put(self.path, resolved(record))

    def plan_nat_change(self, record, new):
        """Turning nat on allocates an egress address; turning it off releases it."""
        if self.params["nat"] == bool(record.get("nat")):
            return
        new["nat"] = self.params["nat"]
        if self.params["nat"]:
            if self.parsed["egress_pool"] is None:
                raise InvalidInput("nat needs egress_pool", name=self.name)
            new["egress_pool"] = self.params["egress_pool"]
            new["egress_address"] = self.plan_egress_allocation(new["egress_pool"])
        else:
            new["egress_address"] = None
            self.plan.add("release egress address %s" % record.get("egress_address"), self.store.release_floating,
                          record.get("egress_pool"), record.get("egress_address"), owner=self.owner)

    def desired(self, record, vtep):
        """Everything the host should have for this network (``record`` with its allocations filled in)."""
        network = ipaddress.ip_network(record["cidr"])
        want = dict(device_names(record["vni"], self.params["namespace_prefix"]))
        want.update(gateway_facts(network))
        peers = next(chosen for chosen in (self.mesh, self.params["mesh_peers"], record.get("vteps") or [])
                     if chosen is not None)
        gateway = bool(self.params["gateway"])
        want.update(
            vni=record["vni"], vtep=vtep, underlay=self.underlay_name, mtu=record["mtu"],
            peers=sorted(set(peers) - {vtep}), gateway=gateway, nat=gateway and bool(record.get("nat")),
            egress=record.get("egress_address"), dhcp=gateway and bool(record.get("dhcp")),
        )
        want["state_dir"] = gateway_state_dir(self.params["state_dir"], want["vni"], self.params["namespace_prefix"])
        if want["dhcp"]:
            svc.check_reachable_by_dnsmasq(want["state_dir"])
        want["conf"] = svc.dnsmasq_conf(want["state_dir"], LAN, network, gateway_ip=want["gateway_ip"],
                                        mtu=want["mtu"], dns_servers=record.get("dns_servers") or [],
                                        dns=bool(record.get("dns", False)))
        want["files"] = gateway_files(self.name, records.instances(self.store)) if want["dhcp"] else {}
        want["nft"] = svc.nft_base_script(LAN, WAN, record["cidr"], want["egress"]) if want["nat"] else None
        return want

    # absent ------------------------------------------------------------------------------------

    def plan_absent(self):
        """Plan this host's part away; the last host out deletes the record and frees its allocations."""
        record = self.record
        vni = record["vni"] if record else self.params["vni"]
        if vni is None:
            return lambda: {"vni": None}
        attached = attached_instances(self.name, records.instances(self.store))
        self.refuse_attached([name for name in attached if name not in self.params["departing_instances"]])
        departing = [name for name in attached if name in self.params["departing_instances"]]
        if departing:
            # An earlier task of this run deletes these; check mode only previewed that, so their records are
            # still here. A real run must find them gone before it changes anything.
            self.plan.add("check that %s no longer use network %s" % (", ".join(departing), self.name),
                          self.refuse_attached_now)
        names = device_names(vni, self.params["namespace_prefix"])
        vtep = self.local_vtep(names)
        self.mesh = self.mesh_vteps(vtep) if vtep else None
        want = dict(names, vni=vni, state_dir=os.path.join(self.params["state_dir"], names["namespace"]))
        HostPlan(self, self.plan, want).teardown()
        if record is not None:
            self.plan_forget(record, vtep)
        return lambda: {"vni": vni, "bridge": names["bridge"], "namespace": names["namespace"]}

    def refuse_attached(self, attached):
        """Conflict naming the instances still attached to the network, if any."""
        if attached:
            raise Conflict("network %s still has instances attached: %s; delete or detach them first"
                           % (self.name, ", ".join(attached)), instances=attached)

    def refuse_attached_now(self):
        """At apply time: no instance record may use the network any more."""
        self.refuse_attached(attached_instances(self.name, records.instances(self.store)))

    def local_vtep(self, names):
        """This host's VTEP: the existing VXLAN link's, else the underlay's; None when neither is there."""
        link = self.host.link(names["vxlan"])
        if link:
            return link["vxlan"]["local"]
        try:
            return self.underlay()[0]
        except InvalidInput:
            return None  # nothing of this network can be on a host without an underlay

    def plan_forget(self, record, vtep):
        """Drop this host from the record; delete record and allocations when no host is left."""
        vteps = self.carriers(record, vtep, joining=False)
        if vteps:
            new = dict(record, vteps=vteps)
            if record.get("gateway_vtep") == vtep:
                new["gateway_vtep"] = None
            if self.plan.compare("record", record, new):
                self.plan.add("remove host %s from %s" % (vtep, self.path), self.write_record, new)
            return
        self.plan.compare("record", record, None)
        self.plan.compare("vni", record["vni"], None)
        if record.get("egress_address"):
            self.plan.add("release egress address %s" % record["egress_address"], self.store.release_floating,
                          record["egress_pool"], record["egress_address"], owner=self.owner)
        self.plan.add("release vni %d" % record["vni"], self.store.release_vni, record["vni"], owner=self.owner)
        self.plan.add("delete addresses of network %s" % self.name, self.store.delete_prefix, "ipam/%s" % self.name)
        self.plan.add("delete etcd record %s" % self.path, self.store.delete, self.path)


class HostPlan:
    """Compares the host with ``want`` and queues the steps that converge it on ``plan``."""

    def __init__(self, runner, plan, want):
        self.runner = runner
        self.plan = plan
        self.handles = runner.handles
        self.host_netns = runner.params["host_netns"]
        self.host = runner.host
        self.want = want
        self._wan_addresses = None
        # Only this network's links: a full dump grows with the number of networks on the host.
        self.links = {}
        for name in self.device_set():
            link = self.host.link(name)
            if link is not None:
                self.links[name] = link

    def ns(self):
        """The gateway namespace's handle (opened when first needed, after it was created)."""
        return self.handles.get(self.want["namespace"])

    # present -----------------------------------------------------------------------------------

    def build(self):
        """Queue every step for the present state."""
        want = self.want
        self.bridge()
        self.vxlan()
        self.fdb()
        if want["gateway"]:
            self.namespace()
        else:
            self.teardown_gateway()
        self.fence()

    def fence(self):
        """The host's fence (network/fence.py) with today's control plane: registered hosts, etcd members."""
        addresses = fence.control_addresses(self.runner.registered(), self.runner.store.gateway.endpoints)
        seen, wanted = fence.observe(self.host_netns), fence.wanted(addresses)
        if self.plan.compare("fence", seen, wanted):
            self.plan.add("write nft table inet %s (control plane: %s)" % (fence.TABLE, ", ".join(addresses)),
                          fence.apply, self.host_netns, addresses)

    def bridge(self):
        """Bridge br-<vni>, with the network's MTU, up."""
        name, link = self.want["bridge"], self.links.get(self.want["bridge"])
        if link is None or link["kind"] != "bridge":
            if link is not None:
                self.plan.add("delete %s (a %s, not a bridge)" % (name, link["kind"]), self.host.delete_link, name)
            self.plan.add("create bridge %s (mtu %d)" % (name, self.want["mtu"]), self.host.add_bridge, name,
                          self.want["mtu"])
            return
        if link["mtu"] != self.want["mtu"] or not link["up"]:
            self.plan.add("set %s mtu %d up" % (name, self.want["mtu"]), self.host.set_link, name,
                          mtu=self.want["mtu"], up=True)
        if not link.get("nf_call_iptables"):
            self.plan.add("pass %s's bridged IPv4 traffic through nftables (for security groups)" % name,
                          self.host.set_bridge_filtering, name)

    def vxlan(self):
        """VXLAN vx-<vni> on the underlay, enslaved to the bridge."""
        want, name = self.want, self.want["vxlan"]
        link = self.links.get(name)
        settings = {"id": want["vni"], "local": want["vtep"], "link": want["underlay"], "port": 4789}
        if link is not None and link.get("vxlan") != settings:
            self.plan.add("delete %s (settings %s, want %s)" % (name, link.get("vxlan"), settings),
                          self.host.delete_link, name)
            link = None
        if link is None:
            self.plan.add("create VXLAN %s (vni %d, local %s on %s, mtu %d)" % (
                name, want["vni"], want["vtep"], want["underlay"], want["mtu"]),
                self.host.add_vxlan, name, want["vni"], local=want["vtep"], underlay=want["underlay"], mtu=want["mtu"])
        if link is None or link["master"] != want["bridge"] or link["mtu"] != want["mtu"] or not link["up"]:
            self.plan.add("attach %s to %s (mtu %d, up)" % (name, want["bridge"], want["mtu"]), self.host.set_link,
                          name, master=want["bridge"], mtu=want["mtu"], up=True)
        self.recreated_vxlan = link is None

    def fdb(self):
        """All-zero FDB entries: one per peer, never to this host."""
        name = self.want["vxlan"]
        observed = [] if self.recreated_vxlan else self.host.fdb_peers(name)
        self.plan.compare("peers", observed, self.want["peers"])
        for peer in self.want["peers"]:
            if peer not in observed:
                self.plan.add("add peer %s to %s" % (peer, name), self.host.add_fdb_peer, name, peer)
        for peer in observed:
            if peer not in self.want["peers"]:
                self.plan.add("remove peer %s from %s" % (peer, name), self.host.del_fdb_peer, name, peer)

    def namespace(self):
        """Gateway namespace with lan (gateway address), optional wan + NAT, optional dnsmasq."""
        want = self.want
        exists = svc.netns_exists(want["namespace"])
        if not exists:
            self.plan.add("create namespace %s" % want["namespace"], svc.netns_add, want["namespace"])
        inside = self.ns().links() if exists else {}
        self.veth(want["lan_host"], LAN, inside, want["mtu"], want["bridge"])
        addresses = {LAN: self.ns().addresses(LAN) if LAN in inside else []}
        self.addresses(LAN, addresses[LAN], [want["gateway_cidr"]])
        if want["nat"]:
            self.egress(inside, addresses)
        elif WAN in inside or want["wan_host"] in self.links:
            self.plan.add("delete egress veth %s (nat is off)" % want["wan_host"], self.host.delete_link,
                          want["wan_host"])
        self.plan.compare("addresses", addresses, self.desired_addresses())
        self.firewall(exists)
        self.dnsmasq()

    def desired_addresses(self):
        """The addresses in the diff: lan's, and with NAT wan's and the host end's."""
        want = self.want
        out = {LAN: [want["gateway_cidr"]]}
        if want["nat"]:
            out[WAN] = self.wan_addresses()
            out[want["wan_host"]] = ["%s/32" % TRANSIT_HOST]
        return out

    def wan_addresses(self):
        """wan's addresses: the egress address, and the floating IPs etcd records on this network.

        smallcloud.kvm.floating_ip puts those on wan; they are not drift to remove here.
        """
        if self._wan_addresses is None:
            floating = records.floating_ips(self.runner.store)
            self._wan_addresses = ["%s/32" % self.want["egress"]] + sorted(
                "%s/32" % record["address"] for record in floating.values()
                if isinstance(record, dict) and record.get("network") == self.runner.name and record.get("address"))
        return self._wan_addresses

    def veth(self, host_end, inner_end, inside, mtu, master):
        """A veth from the host (optionally on ``master``) into the namespace, both ends up."""
        host_link, inner_link = self.links.get(host_end), inside.get(inner_end)
        if host_link is None or inner_link is None:
            if host_link is not None:
                self.plan.add("delete %s (its peer is missing)" % host_end, self.host.delete_link, host_end)
            self.plan.add("create veth %s <-> %s:%s" % (host_end, self.want["namespace"], inner_end),
                          self.host.add_veth, host_end, inner_end, self.want["namespace"], mtu)
            host_link = inner_link = {}
        if host_link.get("master") != master or (mtu and host_link.get("mtu") != mtu) or not host_link.get("up"):
            self.plan.add("set %s%s mtu %s up" % (host_end, " on %s" % master if master else "", mtu),
                          self.host.set_link, host_end, master=master, mtu=mtu, up=True)
        if (mtu and inner_link.get("mtu") != mtu) or not inner_link.get("up"):
            self.plan.add("set %s:%s mtu %s up" % (self.want["namespace"], inner_end, mtu),
                          lambda: self.ns().set_link(inner_end, mtu=mtu, up=True))

    def addresses(self, device, observed, desired, netns_handle=None):
        """Add missing and remove extra addresses of ``device`` (in the namespace unless a handle is given)."""
        where = (lambda: netns_handle) if netns_handle is not None else self.ns
        for address in desired:
            if address not in observed:
                self.plan.add("add %s to %s" % (address, device), lambda a=address: where().add_address(device, a))
        for address in observed:
            if address not in desired:
                self.plan.add("remove %s from %s" % (address, device),
                              lambda a=address: where().del_address(device, a))

    def egress(self, inside, addresses):
        """wan <-> ve-<vni>: egress address, default route to the host, host route back, forwarding on."""
        want = self.want
        self.veth(want["wan_host"], WAN, inside, None, None)
        addresses[WAN] = self.ns().addresses(WAN) if WAN in inside else []
        addresses[want["wan_host"]] = self.host.addresses(want["wan_host"])
        self.addresses(WAN, addresses[WAN], self.wan_addresses())
        self.addresses(want["wan_host"], addresses[want["wan_host"]], ["%s/32" % TRANSIT_HOST], self.host)
        inner_routes = self.ns().routes() if WAN in inside else []
        host_routes = self.host.routes()
        wanted_inner = [("%s/32" % TRANSIT_HOST, None, WAN), ("0.0.0.0/0", TRANSIT_HOST, WAN)]
        for dst, gateway, device in wanted_inner:
            if (dst, gateway, device) not in inner_routes:
                self.plan.add("add route %s%s dev %s in %s" % (dst, " via %s" % gateway if gateway else "", device,
                                                               want["namespace"]),
                              lambda d=dst, g=gateway: self.ns().add_route(d, WAN, g))
        back = ("%s/32" % want["egress"], None, want["wan_host"])
        if back not in host_routes:
            self.plan.add("add route %s dev %s" % (back[0], back[2]), self.host.add_route, back[0], back[2])
        self.forwarding(self.host_netns, "host", True)
        self.forwarding(want["namespace"], want["namespace"], svc.netns_exists(want["namespace"]))

    def forwarding(self, netns, label, exists):
        """IPv4 forwarding on in ``netns`` (a new namespace starts with it off)."""
        if not exists or svc.sysctl_get(netns, "net.ipv4.ip_forward") != "1":
            self.plan.add("enable IPv4 forwarding in %s" % label, svc.sysctl_set, netns, "net.ipv4.ip_forward", 1)

    def firewall(self, exists):
        """table ip smallcloud: the network's NAT and isolation rules (floating chains are left alone)."""
        want = self.want
        observed = svc.nft_table(want["namespace"]) if exists else None
        observed_base = None
        if observed is not None:
            observed_base = {chain: rules for chain, rules in observed.items()
                             if chain in ("prerouting", "postrouting", "forward")}
        desired = None
        if want["nat"]:
            desired = {}
            for chain, _body, comment in svc.nft_base_rules(LAN, WAN, self.runner_cidr(), want["egress"]):
                desired.setdefault(chain, []).append(comment)
        if not self.plan.compare("rules", observed_base, desired):
            return
        if desired is None:
            self.plan.add("delete nft table ip %s in %s" % (svc.NFT_TABLE, want["namespace"]),
                          svc.nft_delete_table, want["namespace"])
        else:
            self.plan.add("write nft table ip %s in %s" % (svc.NFT_TABLE, want["namespace"]),
                          svc.nft_apply, want["namespace"], want["nft"])

    def runner_cidr(self):
        """The network's CIDR as text."""
        return self.runner.parsed["network"].with_prefixlen

    def dnsmasq(self):
        """dnsmasq in the namespace: conf, static leases and names (SIGHUP on change), running."""
        want, state_dir = self.want, self.want["state_dir"]
        conf_path = os.path.join(state_dir, "dnsmasq.conf")
        conf = files.read_text(conf_path)
        have = {name: files.read_text(os.path.join(state_dir, name)) for name in ("hosts", "names")}
        pid = svc.dnsmasq_pid(state_dir)
        if not want["dhcp"]:
            self.plan.compare("leases", have["hosts"], None)
            if pid is not None or conf is not None:
                self.plan.add("stop dnsmasq in %s" % want["namespace"], svc.dnsmasq_stop, state_dir)
                self.plan.add("remove %s" % state_dir, svc.remove_state_dir, state_dir)
            return
        self.plan.compare("leases", have["hosts"], want["files"]["hosts"])
        self.plan.compare("names", have["names"], want["files"]["names"])
        if conf != want["conf"]:
            self.plan.add("write %s" % conf_path, files.write_text, conf_path, want["conf"])
        stale = [name for name, text in want["files"].items() if have[name] != text]
        for name in stale:
            path, text = os.path.join(state_dir, name), want["files"][name]
            self.plan.add("write %s (%d lines)" % (path, text.count("\n")), files.write_text, path, text)
        if pid is not None and conf != want["conf"]:
            self.plan.add("stop dnsmasq (configuration changed)", svc.dnsmasq_stop, state_dir)
            pid = None
        if pid is None:
            self.plan.add("start dnsmasq in %s" % want["namespace"], svc.dnsmasq_start, want["namespace"], state_dir)
        elif stale:
            self.plan.add("reload dnsmasq leases and names (SIGHUP)", svc.dnsmasq_reload, state_dir)

    # absent ------------------------------------------------------------------------------------

    def teardown_gateway(self):
        """Remove dnsmasq, namespace and state files of this network on this host."""
        want = self.want
        if svc.dnsmasq_pid(want["state_dir"]) is not None:
            self.plan.add("stop dnsmasq in %s" % want["namespace"], svc.dnsmasq_stop, want["state_dir"])
        # Host ends first: a veth dies with its namespace only when the kernel gets round to it.
        for name in (want["lan_host"], want["wan_host"]):
            if name in self.links:
                self.plan.add("delete %s" % name, self.host.delete_link, name)
        if svc.netns_exists(want["namespace"]):
            self.plan.add("delete namespace %s" % want["namespace"], self.delete_namespace)
        if os.path.isdir(want["state_dir"]):
            self.plan.add("remove %s" % want["state_dir"], svc.remove_state_dir, want["state_dir"])

    def delete_namespace(self):
        """Close our handle on the namespace, then delete it (its veth ends and nft table go with it)."""
        self.handles.drop(self.want["namespace"])
        svc.netns_delete(self.want["namespace"])

    def teardown(self):
        """Queue removal of everything this network has on this host (and the fence, with the last network)."""
        self.plan.compare("links", sorted(n for n in self.links if n in self.device_set()), [])
        self.teardown_gateway()
        for name in (self.want["vxlan"], self.want["bridge"]):
            if name in self.links:
                self.plan.add("delete %s" % name, self.host.delete_link, name)
        others = [name for name in self.host.links() if NETWORK_LINK.match(name) and name not in self.device_set()]
        if not others and fence.observe(self.host_netns) is not None:
            self.plan.add("delete nft table inet %s (the last network left this host)" % fence.TABLE,
                          fence.remove, self.host_netns)

    def device_set(self):
        """Names of this network's links on the host."""
        return {self.want["vxlan"], self.want["bridge"], self.want["lan_host"], self.want["wan_host"]}
