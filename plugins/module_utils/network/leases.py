# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which instances a network serves: static DHCP leases from the instance records, and who is attached."""

import os
import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import files
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import gateway_state_dir

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def leases_for(network_name, instances):
    """``[(mac, ip, hostname)]`` of every instance interface on ``network_name``.

    The hostname is the first label of the guest's own (its record's ``hostname``, else the instance
    name), or None when that is not a valid DNS label.
    """
    leases = []
    for key, record in sorted((instances or {}).items()):
        if not isinstance(record, dict):
            continue
        label = (record.get("hostname") or record.get("name") or key).split(".")[0]
        for nic in record.get("interfaces") or []:
            if nic.get("network") == network_name and nic.get("mac") and nic.get("ip"):
                leases.append((nic["mac"], nic["ip"], label if HOSTNAME_RE.match(label) else None))
    return leases


def gateway_files(network_name, instances):
    """``{file name: text}`` the gateway's dnsmasq reads on SIGHUP: static leases and instance names."""
    leases = leases_for(network_name, instances)
    return {"hosts": svc.dnsmasq_hosts(leases), "names": svc.dnsmasq_names(leases)}


def attached_instances(network_name, instances):
    """Sorted names of instances with an interface on ``network_name``."""
    names = set()
    for key, record in (instances or {}).items():
        if isinstance(record, dict) and any(nic.get("network") == network_name
                                            for nic in record.get("interfaces") or []):
            names.add(record.get("name") or key)
    return sorted(names)


def refresh_leases(network_name, record, instances, state_dir, namespace_prefix):
    """Rewrite the static leases of the network's dnsmasq if it runs on this host, and SIGHUP it.

    For modules that change instance records between runs of the network module; True when reloaded.
    """
    if record.get("vni") is None or not record.get("dhcp", True):
        return False
    gateway_dir = gateway_state_dir(state_dir, record["vni"], namespace_prefix)
    if svc.dnsmasq_pid(gateway_dir) is None:
        return False  # the network's gateway is another host
    stale = {name: text for name, text in gateway_files(network_name, instances).items()
             if files.read_text(os.path.join(gateway_dir, name)) != text}
    for name, text in stale.items():
        files.write_text(os.path.join(gateway_dir, name), text)
    if stale:
        svc.dnsmasq_reload(gateway_dir)
    return bool(stale)
