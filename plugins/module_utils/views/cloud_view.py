# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``cloud_info`` module's logic: what etcd records next to what this host runs, differences flagged.

Read-only. One etcd listing per folder (networks, instances, floating, optionally events) and one
libvirt connection; a record or a host object that has no counterpart, or disagrees with it, becomes an
entry of ``differences``: ``{"kind", "name", "problem"}``.
"""

import os
import socket

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.connection import libvirt, open_libvirt
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import (
    ETCD_ARGS,
    LIBVIRT_ARGS,
    NAMESPACE_ARGS,
    SYSFS_ARGS,
    with_common,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import bridge_of
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (
    Placements,
    free_capacity,
    reserved_of,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(events=dict(type="bool", default=False)),
        ETCD_ARGS,
        LIBVIRT_ARGS,
        NAMESPACE_ARGS,
        SYSFS_ARGS,
    ),
    supports_check_mode=True,
)


def host_domains(conn):
    """``{name: {"managed", "state", "macs", "bridges"}}`` of every domain libvirt has on this host."""
    found = {}
    for domain in conn.listAllDomains(0):
        try:
            seen = dom_xml.observe(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            active = domain.isActive()
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined since the listing, by another run: not on this host any more
            raise
        found[domain.name()] = {
            "managed": seen["managed"],
            "state": "running" if active else "stopped",
            "macs": [nic["mac"] for nic in seen["nics"]],
            "bridges": [nic["bridge"] for nic in seen["nics"]],
        }
    return found


def instance_differences(records, domains, host):
    """Differences between the instance records of ``host`` and its domains."""
    problems = []
    for name, record in sorted(records.items()):
        if not isinstance(record, dict) or record.get("host") not in (None, host):
            continue
        domain = domains.get(name)
        if domain is None:
            problems.append({"kind": "instance", "name": name, "problem": "recorded on this host but not defined"})
            continue
        if record.get("state") and record["state"] != domain["state"]:
            problems.append({"kind": "instance", "name": name, "problem": "recorded %s but %s" % (
                record["state"], domain["state"])})
        macs = [nic.get("mac") for nic in record.get("interfaces") or []]
        if macs != domain["macs"]:
            problems.append({"kind": "instance", "name": name, "problem": "recorded MACs %s but the domain has %s"
                             % (", ".join(macs) or "none", ", ".join(domain["macs"]) or "none")})
    for name, domain in sorted(domains.items()):
        if domain["managed"] and name not in records:
            problems.append({"kind": "instance", "name": name, "problem": "smallcloud domain without a record"})
    return problems


def network_view(records, sysfs_root, prefix):
    """Each network record with whether its bridge exists here; differences for missing bridges."""
    view, problems = {}, []
    for name, record in sorted(records.items()):
        if not isinstance(record, dict) or record.get("vni") is None:
            continue
        bridge = bridge_of(record, prefix)
        present = os.path.isdir(os.path.join(sysfs_root, "class", "net", bridge))
        view[name] = dict(record, bridge=bridge, bridge_present=present)
    return view, problems


def run(module):
    """Entry point for run_module: the cloud as etcd records it and as this host runs it."""
    params = module.params
    store = Store.from_params(params)
    host = socket.gethostname()
    instance_records = records.instances(store)
    networks, problems = network_view(records.networks(store), params["sysfs_root"],
                                      params["namespace_prefix"])
    conn = open_libvirt(params["uri"])
    try:
        domains = host_domains(conn)
    finally:
        conn.close()
    problems += instance_differences(instance_records, domains, host)
    for name, network in networks.items():
        users = [r for r in instance_records.values() if isinstance(r, dict) and r.get("host") in (None, host)
                 and any(nic.get("network") == name for nic in r.get("interfaces") or [])]
        if users and not network["bridge_present"]:
            problems.append({"kind": "network", "name": name, "problem": "instances here use it but bridge %s is "
                             "missing" % network["bridge"]})
    result = {
        "changed": False, "host": host, "networks": networks, "instances": instance_records,
        "floating": store.list("floating"), "floating_ips": records.floating_ips(store),
        "security_groups": records.security_groups(store), "domains": domains, "differences": problems,
    }
    result.update(placement_view(store))
    if params["events"]:
        result["events"] = store.list("events")
    return result


def placement_view(store):
    """``hosts`` (each record with what is reserved and free, and its instances) and ``placements``."""
    view = Placements(store)
    ledgers = view.ledgers()
    hosts = {}
    for name, record in view.hosts().items():
        ledger = ledgers.get(name) or {}
        hosts[name] = dict(record, reserved=reserved_of(ledger), free=free_capacity(record, ledger),
                           placed=sorted(ledger.get("instances") or {}))
    placements = {name: value for name, (value, _rev) in view.current()["placements"].items()}
    return {"hosts": hosts, "placements": placements}
