# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``host`` module: this hypervisor's record in the registry other hosts read.

etcd: ``hosts/NAME`` = ``{"name", "hostname", "underlay_interface", "underlay_address", "virt_type", "state",
"capacity", "allocation_ratios"}``. Other hypervisors build their VXLAN meshes from ``underlay_address``;
``hostname`` is what instance records name as their ``host``; placement (host.placement) reads ``capacity``
(vCPUs, memory, the size of the instances directory's file system), the per-host ``allocation_ratios`` and
``state``: ``active`` (a new record), ``draining`` (no new placement) or ``drained``.
"""

import os
import socket

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, HOST_NETNS_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (
    ACTIVE,
    DRAINED,
    DRAINING,
    HOST_STATES,
    RATIO_NAMES,
    check_ratio,
    ledger_key,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import Handles, underlay_of
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

VIRT_TYPES = ["kvm", "qemu"]
DEFAULT_INSTANCES_DIR = "/var/lib/smallcloud/instances"

# plugins/modules/host.py documents exactly these.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            # No spec default: the host name is this machine's, known only when the module runs.
            name=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            underlay_interface=dict(type="str"),
            virt_type=dict(type="str", choices=VIRT_TYPES),
            status=dict(type="str", choices=list(HOST_STATES)),
            instances_dir=dict(type="path", default=DEFAULT_INSTANCES_DIR),
            **{option: dict(type="raw") for option in RATIO_NAMES.values()}
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
    ratios = {option: check_ratio(option, params[option]) for option in RATIO_NAMES.values()
              if params.get(option) is not None}
    observed = {"capacity": capacity(params["instances_dir"]), "ratios": ratios, "status": params.get("status")}
    # Held from reading the record to writing it, so two runs for one name never interleave.
    with store.lock("host/%s" % name, ttl=30, timeout=60):
        plan = Plan()
        current = store.get(records.host_key(name))
        if present:
            check_state_change(store, name, current, params.get("status"))
            want = desired(name, current, underlay, params["virt_type"], observed)
            after = plan_present(plan, store, name, current, want)
        else:
            after = plan_absent(plan, store, name, current)
        plan.apply(module.check_mode)
        return plan.result(host=after)


def desired(name, current, underlay, virt_type, observed):
    """The record wanted for ``name``: the observed underlay and capacity over the current record.

    Keys this module does not own are kept, and so are ``state``, ``virt_type`` and each allocation ratio when
    the task does not set them: unset means "don't care".
    """
    current = current or {}
    interface, address, _mtu = underlay
    want = dict(current)
    want.update(name=name, hostname=socket.gethostname(), underlay_interface=interface, underlay_address=address,
                virt_type=virt_type or current.get("virt_type"),
                state=observed["status"] or current.get("state") or ACTIVE, capacity=observed["capacity"],
                allocation_ratios=dict(current.get("allocation_ratios") or {}, **observed["ratios"]))
    return want


def check_state_change(store, name, current, status):
    """Refuse the state changes that would strand instances: draining the last active host, draining a host that
    is drained already, and calling a host drained while instances are still there."""
    state = (current or {}).get("state") or ACTIVE
    if status is None or status == state:
        return
    if status == DRAINING and state == DRAINED:
        raise InvalidInput("host %s is drained already; set it active first to drain it again" % name, host=name,
                           state=state)
    if status in (DRAINING, DRAINED) and state == ACTIVE:
        others = [host for host, record in records.hosts(store).items()
                  if host != name and isinstance(record, dict) and record.get("state", ACTIVE) == ACTIVE]
        if not others:
            raise InvalidInput("host %s is the last active host; its instances would have nowhere to go: activate "
                               "another host first" % name, host=name)
    if status == DRAINED:
        left = instances_on(store, name, (current or {}).get("hostname"))
        if left:
            raise Conflict("host %s still has instances: %s; evacuate it before calling it drained"
                           % (name, ", ".join(left)), host=name, instances=left)


def capacity(instances_dir):
    """What this host offers to placement: online CPUs, memory (MiB) and the size (GiB) of the file system that
    holds ``instances_dir`` (its nearest existing parent before the first instance)."""
    path = os.path.abspath(instances_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    stat = os.statvfs(path)
    return {"vcpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_mb": memory_mib(), "disk_gb": stat.f_frsize * stat.f_blocks // 2 ** 30}


def memory_mib(meminfo="/proc/meminfo"):
    """MemTotal in MiB."""
    with open(meminfo, encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise HostError("%s has no MemTotal line" % meminfo)


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
    placed += sorted(set((store.get(ledger_key(name)) or {}).get("instances") or {}) - set(placed))
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
