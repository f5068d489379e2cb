# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``host`` module: this hypervisor's record in the registry other hosts read.

etcd: ``hosts/NAME`` = ``{"name", "hostname", "underlay_interface", "underlay_address", "virt_type", "state"}``.
Other hypervisors build their VXLAN meshes from ``underlay_address``; ``hostname`` is what instance records
name as their ``host``. ``state`` starts ``active`` and is never changed here (draining is another module's).
"""

import socket

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, HOST_NETNS_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import Handles, underlay_of
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

ACTIVE = "active"
VIRT_TYPES = ["kvm", "qemu"]

# plugins/modules/host.py documents exactly these.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            # No spec default: the host name is this machine's, known only when the module runs.
            name=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            underlay_interface=dict(type="str"),
            virt_type=dict(type="str", choices=VIRT_TYPES),
        ),
        ETCD_ARGS,
        HOST_NETNS_ARGS,
    ),
    supports_check_mode=True,
)


def run(module):
    """Entry point for run_module."""
    store = Store.from_params(module.params)
    handles = Handles()
    try:
        return converge(module, store, handles)
    finally:
        handles.close()


def converge(module, store, handles):
    """Observe the host and its record, plan, apply (a preview in check mode); the module's result."""
    params = module.params
    name = check_name("host", params["name"] or socket.gethostname())
    present = params["state"] == "present"
    # Read before the lock, so a wrong interface fails before etcd is touched; absent needs no underlay
    # (a host being retired may have lost it already).
    underlay = underlay_of(handles.get(params["host_netns"]), params["underlay_interface"]) if present else None
    # Held from reading the record to writing it, so two runs for one name never interleave.
    with store.lock("host/%s" % name, ttl=30, timeout=60):
        plan = Plan()
        current = store.get(records.host_key(name))
        if present:
            after = plan_present(plan, store, name, current, desired(name, current, underlay, params["virt_type"]))
        else:
            after = plan_absent(plan, store, name, current)
        plan.apply(module.check_mode)
        return plan.result(host=after)


def desired(name, current, underlay, virt_type):
    """The record wanted for ``name``: the observed underlay over the current record.

    Keys this module does not own (a later module's capacity, say) are kept, and so are ``state`` (draining
    is decided elsewhere) and ``virt_type`` when the task does not set it: unset means "don't care".
    """
    current = current or {}
    interface, address, _mtu = underlay
    want = dict(current)
    want.update(name=name, hostname=socket.gethostname(), underlay_interface=interface, underlay_address=address,
                virt_type=virt_type or current.get("virt_type"), state=current.get("state") or ACTIVE)
    return want


def plan_present(plan, store, name, current, want):
    """Queue the one write that makes ``hosts/NAME`` ``want``, if anything differs; the record after."""
    differing = compare_record(plan, current, want)
    key = records.host_key(name)
    if current is None:
        plan.add("register host %s (%s)" % (name, want["underlay_address"]), create_record, store, key, want)
    elif differing:
        plan.add("update host %s: %s" % (name, ", ".join(differing)), store.put, key, want)
    return want


def create_record(store, key, record):
    """Create ``key``; a record that appeared since it was read (another run without the lock) is a Conflict."""
    if not store.create(key, record):
        raise Conflict("%s was registered by another run meanwhile; run again to update it" % key, key=key)


def compare_record(plan, current, want):
    """Record the diff field by field (the whole record when it is new or goes); the keys that differ."""
    if current is None or want is None:
        return ["record"] if plan.compare("record", current, want) else []
    return [field for field in sorted(set(current) | set(want))
            if plan.compare(field, current.get(field), want.get(field))]


def plan_absent(plan, store, name, current):
    """Queue the deletion of ``hosts/NAME`` unless instances still live there; None (the record after)."""
    if current is None:
        return None  # never registered, or already gone: nothing to do
    placed = instances_on(store, name, current.get("hostname"))
    if placed:
        raise Conflict("host %s still has instances: %s; remove or move them first"
                       % (name, ", ".join(placed)), name=name, instances=placed)
    compare_record(plan, current, None)
    plan.add("deregister host %s" % name, store.delete, records.host_key(name))
    return None


def instances_on(store, name, hostname):
    """Sorted names of the instances whose record places them on this host (by registry name or host name)."""
    names = {name, hostname} - {None}
    return sorted(instance for instance, record in records.instances(store).items()
                  if isinstance(record, dict) and record.get("host") in names)
