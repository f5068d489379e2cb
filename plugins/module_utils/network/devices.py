# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host objects of a network, all named from its VNI so any host finds them without asking etcd,
and the netlink handles the network runners share."""

import os
import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

DEFAULT_NAMESPACE_PREFIX = "scnet-"
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
TRANSIT_HOST = "169.254.0.1"  # the host end of every egress veth; the namespace's default gateway
LAN, WAN = "lan", "wan"


def device_names(vni, prefix=DEFAULT_NAMESPACE_PREFIX):
    """Every name derived from ``vni``: links on the host (<= 15 chars) and the gateway namespace."""
    tag = "%x" % vni
    return {
        "vxlan": "vx-" + tag,
        "bridge": "br-" + tag,
        "lan_host": "vg-" + tag,
        "wan_host": "ve-" + tag,
        "namespace": prefix + tag,
    }


def bridge_of(record, prefix):
    """The bridge of a network record on every host."""
    return device_names(record["vni"], prefix)["bridge"]


def check_namespace_prefix(prefix):
    """Raise InvalidInput unless ``prefix`` can start a namespace name."""
    if not PREFIX_RE.match(prefix or ""):
        raise InvalidInput("namespace_prefix %r is not allowed: use 1-32 letters, digits, '.', '_' or '-'"
                           % (prefix,), namespace_prefix=prefix)


def gateway_state_dir(state_dir, vni, namespace_prefix):
    """Where a network's dnsmasq keeps its conf, hosts, leases and pid file on its gateway host."""
    return os.path.join(state_dir, device_names(vni, namespace_prefix)["namespace"])


class Handles:
    """Netlink handles opened on first use and closed together."""

    def __init__(self):
        self._open = {}

    def get(self, netns):
        """The NetDev of ``netns`` (None: the module's own namespace)."""
        if netns not in self._open:
            # Imported here: pyroute2 takes ~0.15 s to import, and the modules that only name devices
            # (instance, cloud_info) should not pay for it.
            from ansible_collections.smallcloud.kvm.plugins.module_utils.network.netdev import NetDev  # noqa: PLC0415

            self._open[netns] = NetDev(netns)
        return self._open[netns]

    def drop(self, netns):
        """Forget (and close) the handle of a namespace about to be deleted."""
        handle = self._open.pop(netns, None)
        if handle is not None:
            handle.close()

    def close(self):
        """Close every handle."""
        for netns in list(self._open):
            self.drop(netns)


def underlay_of(host, name=None):
    """``(interface, IPv4 address, mtu)`` of the underlay on ``host`` (a NetDev): ``name``, or the default
    route's device when no name is given. InvalidInput when it is missing or carries no IPv4 address."""
    if not name:
        name = host.default_route_device()
        if name is None:
            raise InvalidInput("underlay_interface is not set and this host has no IPv4 default route to take "
                               "it from; name the interface that reaches the other hypervisors",
                               underlay_interface=None)
    link = host.link(name)
    if link is None:
        raise InvalidInput("underlay_interface %s does not exist on this host (interfaces: %s)"
                           % (name, ", ".join(sorted(host.links()))), underlay_interface=name)
    addresses = host.addresses(name)
    if not addresses:
        raise InvalidInput("underlay_interface %s has no IPv4 address to carry VXLAN" % name,
                           underlay_interface=name)
    return name, addresses[0].split("/")[0], link["mtu"]
