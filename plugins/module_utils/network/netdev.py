# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Links, bridge, VXLAN, FDB, addresses and routes in one network namespace, through pyroute2.

``NetDev(netns)`` opens netlink in the named namespace (``None``: the caller's own namespace, the
host's root namespace on a hypervisor). Every method raises HostError naming the interface on failure.
"""

import errno
import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, MissingLibrary

try:
    from pyroute2 import IPRoute
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.rtnl import RTM_GETNEIGH
    from pyroute2.netlink.rtnl.ndmsg import ndmsg
    from pyroute2.netns import setns

    HAS_PYROUTE2 = True
except ImportError:  # pragma: no cover - depends on the managed host
    HAS_PYROUTE2 = False

    class NetlinkError(Exception):
        """Stand-in so except clauses stay valid without pyroute2."""


ZERO_MAC = "00:00:00:00:00:00"
VXLAN_PORT = 4789
IFNAMSIZ = 15
DUMP_RETRIES = 10


def require_pyroute2():
    """Raise MissingLibrary unless pyroute2 imports."""
    if not HAS_PYROUTE2:
        raise MissingLibrary("pyroute2 is required on the managed host (Debian: python3-pyroute2)", library="pyroute2")


class NetDev:
    """A netlink handle on one namespace; use as a context manager."""

    def __init__(self, netns=None, netns_dir="/run/netns"):
        require_pyroute2()
        self.netns = netns
        self.path = os.path.join(netns_dir, netns) if netns else None
        self._strict = None
        try:
            self.ipr = _socket_in(self.path) if netns else IPRoute()
        except (OSError, NetlinkError) as error:
            raise HostError("cannot open network namespace %s: %s" % (netns, error), netns=netns) from error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the netlink sockets."""
        self.ipr.close()
        if self._strict is not None:
            self._strict.close()

    def _call(self, what, function, *args, **kwargs):
        """Run one netlink request; NetlinkError becomes HostError naming ``what``."""
        for attempt in range(DUMP_RETRIES):
            try:
                return function(*args, **kwargs)
            except NetlinkError as error:
                # A dump races with changes other runs make in the same namespace: the kernel says
                # "dump interrupted" (code -1) and asking again is the documented answer.
                if error.code == -1 and attempt + 1 < DUMP_RETRIES:
                    continue
                raise HostError(
                    "%s failed in namespace %s: %s" % (what, self.netns or "(root)", error), netns=self.netns
                ) from error
        return None  # not reached: the last attempt returns or raises

    # links -----------------------------------------------------------------------------------

    def index(self, name):
        """The ifindex of ``name``, or None."""
        found = self._call("looking up %s" % name, self.ipr.link_lookup, ifname=name)
        return found[0] if found else None

    def links(self):
        """``{name: summary}`` of every link: kind, index, mtu, up, master (name), vxlan settings."""
        raw = self._call("listing links", self.ipr.get_links)
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in raw}
        return {names[msg["index"]]: _summary(msg, names.get) for msg in raw}

    def link(self, name):
        """The summary of link ``name`` (see links()), or None; asks for that one link only."""
        msg = self._get_link(ifname=name)
        return _summary(msg, self._name_of) if msg is not None else None

    def _get_link(self, **which):
        """One RTM_GETLINK answer, or None when there is no such link."""
        try:
            return self._call_raw(self.ipr.link, "get", **which)[0]
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                return None
            raise HostError("looking up link %s failed in namespace %s: %s" % (which, self.netns or "(root)", error),
                            netns=self.netns) from error

    def _call_raw(self, function, *args, **kwargs):
        """Run one netlink request, retrying interrupted dumps; NetlinkError propagates."""
        for attempt in range(DUMP_RETRIES):
            try:
                return function(*args, **kwargs)
            except NetlinkError as error:
                if error.code != -1 or attempt + 1 == DUMP_RETRIES:
                    raise
        return None  # not reached

    def _name_of(self, index):
        """The name of the link with ``index`` (None for none)."""
        if not index:
            return None
        msg = self._get_link(index=index)
        return msg.get_attr("IFLA_IFNAME") if msg is not None else None

    def add_bridge(self, name, mtu):
        """Create bridge ``name``, up, its IPv4 traffic passed through the inet hooks (see set_bridge_filtering)."""
        self._call("creating bridge %s" % name, self.ipr.link, "add", ifname=name, kind="bridge",
                   br_nf_call_iptables=1)
        self.set_link(name, mtu=mtu, up=True)

    def set_bridge_filtering(self, name):
        """Pass the IPv4 frames bridge ``name`` forwards through the inet family's hooks, where the security
        groups (conntrack: stateful) see them. Per bridge, so it holds whatever the host's
        ``net.bridge.bridge-nf-call-iptables`` says (br_netfilter must be loaded: the hypervisor role loads it)."""
        self._call("setting nf_call_iptables on %s" % name, self.ipr.link, "set", index=self.index(name),
                   kind="bridge", br_nf_call_iptables=1)

    def add_vxlan(self, name, vni, *, local, underlay, mtu, port=VXLAN_PORT):
        """Create unicast VXLAN ``name`` (no group: peers come from FDB entries), up."""
        self._call(
            "creating VXLAN %s" % name, self.ipr.link, "add", ifname=name, kind="vxlan", vxlan_id=vni,
            vxlan_local=local, vxlan_link=self.index(underlay), vxlan_port=port, vxlan_learning=1,
        )
        self.set_link(name, mtu=mtu, up=True)

    def add_veth(self, name, peer, peer_netns=None, mtu=None):
        """Create veth ``name``; its ``peer`` end goes straight into ``peer_netns`` when given."""
        peer_spec = {"ifname": peer}
        if peer_netns:
            peer_spec["net_ns_fd"] = peer_netns
        self._call("creating veth %s" % name, self.ipr.link, "add", ifname=name, kind="veth", peer=peer_spec)
        self.set_link(name, mtu=mtu, up=True)

    def delete_link(self, name):
        """Delete link ``name`` if it exists (a veth takes its peer with it)."""
        index = self.index(name)
        if index is None:
            return
        try:
            self.ipr.link("del", index=index)
        except NetlinkError as error:
            if error.code != errno.ENODEV:  # gone meanwhile (its namespace or peer went first) is fine
                raise HostError("deleting %s failed in namespace %s: %s" % (name, self.netns or "(root)", error),
                                netns=self.netns) from error

    def set_link(self, name, master=None, mtu=None, up=None):
        """Set the bridge master, MTU and/or admin state of ``name``."""
        index = self.index(name)
        if index is None:
            raise HostError("interface %s does not exist in namespace %s" % (name, self.netns or "(root)"))
        changes = {}
        if master is not None:
            changes["master"] = self.index(master)
        if mtu is not None:
            changes["mtu"] = mtu
        if up is not None:
            changes["state"] = "up" if up else "down"
        if changes:
            self._call("setting %s on %s" % (sorted(changes), name), self.ipr.link, "set", index=index, **changes)

    # addresses and routes --------------------------------------------------------------------

    def addresses(self, name):
        """Sorted IPv4 addresses of ``name`` as 'a.b.c.d/len'."""
        index = self.index(name)
        if index is None:
            return []
        raw = self._call("listing addresses of %s" % name, self.ipr.get_addr, family=2, index=index)
        return sorted("%s/%d" % (msg.get_attr("IFA_ADDRESS"), msg["prefixlen"]) for msg in raw)

    def add_address(self, name, address):
        """Add 'a.b.c.d/len' to ``name``."""
        ip, prefix = address.split("/")
        self._call("adding %s to %s" % (address, name), self.ipr.addr, "add", index=self.index(name),
                   address=ip, prefixlen=int(prefix))

    def del_address(self, name, address):
        """Remove 'a.b.c.d/len' from ``name``."""
        ip, prefix = address.split("/")
        self._call("removing %s from %s" % (address, name), self.ipr.addr, "del", index=self.index(name),
                   address=ip, prefixlen=int(prefix))

    def routes(self):
        """Sorted main-table IPv4 routes as (dst 'a.b.c.d/len', gateway or None, device name)."""
        links = self._call("listing links", self.ipr.get_links)
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in links}
        out = []
        for msg in self._call("listing routes", self.ipr.get_routes, family=2, table=254):
            dst = "%s/%d" % (msg.get_attr("RTA_DST") or "0.0.0.0", msg["dst_len"])  # noqa: S104 - a route, not a bind
            out.append((dst, msg.get_attr("RTA_GATEWAY"), names.get(msg.get_attr("RTA_OIF"))))
        return sorted(out, key=lambda route: (route[0], route[1] or "", route[2] or ""))

    def default_route_device(self):
        """The device of the IPv4 default route (the underlay a host reaches its peers on), or None."""
        for dst, _gateway, device in self.routes():
            if dst == "0.0.0.0/0":  # noqa: S104 - a route, not a bind
                return device
        return None

    @staticmethod
    def _route_spec(dst, index, gateway):
        """Netlink route attributes; the scope must match on delete too."""
        spec = dict(dst=dst, oif=index)
        if gateway:
            spec["gateway"] = gateway
        else:
            spec["scope"] = 253  # link: the destination is directly on this link
        return spec

    def add_route(self, dst, device, gateway=None):
        """Add route ``dst`` out of ``device`` (on-link when no ``gateway``)."""
        self._call("adding route %s dev %s" % (dst, device), self.ipr.route, "add",
                   **self._route_spec(dst, self.index(device), gateway))

    def del_route(self, dst, device, gateway=None):
        """Remove route ``dst`` out of ``device`` if that device still exists."""
        index = self.index(device)
        if index is not None:
            self._call("removing route %s dev %s" % (dst, device), self.ipr.route, "del",
                       **self._route_spec(dst, index, gateway))

    # VXLAN forwarding database ---------------------------------------------------------------

    def fdb_peers(self, name):
        """Sorted underlay addresses that ``name`` floods to (all-zero-MAC FDB entries)."""
        index = self.index(name)
        if index is None:
            return []
        peers = set()
        for msg in self._fdb_dump(name, index):
            if msg["ifindex"] == index and msg.get_attr("NDA_LLADDR") == ZERO_MAC and msg.get_attr("NDA_DST"):
                peers.add(msg.get_attr("NDA_DST"))
        return sorted(peers)

    def _fdb_dump(self, name, index):
        """FDB entries of one port, filtered by the kernel (strict checking + NDA_IFINDEX).

        pyroute2's fdb("dump", ifindex=...) dumps every entry of the namespace and filters in Python,
        which grows with the number of networks on the host.
        """
        if self._strict is None:
            opener = (lambda: _socket_in(self.path, strict_check=True)) if self.path else (
                lambda: IPRoute(strict_check=True))
            self._strict = self._call("opening a strict netlink socket", opener)
        request = ndmsg()
        request["family"] = 7  # AF_BRIDGE
        request["attrs"] = [("NDA_IFINDEX", index)]
        try:
            return self._call_raw(self._strict.nlm_request, request, msg_type=RTM_GETNEIGH,
                                  msg_flags=NLM_F_REQUEST | NLM_F_DUMP)
        except NetlinkError:
            # Kernels without strict dump checking: the unfiltered dump, filtered by the caller.
            return self._call("listing FDB of %s" % name, self.ipr.fdb, "dump", ifindex=index)

    def add_fdb_peer(self, name, peer):
        """Flood broadcast/unknown traffic of ``name`` to ``peer`` too (head-end replication)."""
        self._call("adding FDB peer %s to %s" % (peer, name), self.ipr.fdb, "append", ifindex=self.index(name),
                   lladdr=ZERO_MAC, dst=peer)

    def del_fdb_peer(self, name, peer):
        """Stop flooding ``name``'s traffic to ``peer``."""
        self._call("removing FDB peer %s from %s" % (peer, name), self.ipr.fdb, "del", ifindex=self.index(name),
                   lladdr=ZERO_MAC, dst=peer)


def _socket_in(path, **options):
    """An IPRoute socket bound to the namespace at ``path``.

    The calling thread enters the namespace just long enough to open the socket (the socket keeps it),
    then returns. setns() is per thread, so other threads (etcd lease keep-alives) are unaffected, and
    nothing forks: pyroute2's NetNS forks a helper, which can deadlock on locks held by other threads.
    """
    target = os.open(path, os.O_RDONLY)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(target, flags=0)
        try:
            return IPRoute(**options)
        finally:
            setns(home, flags=0)
    finally:
        os.close(target)
        os.close(home)


def _summary(msg, name_of):
    """The parts of an RTM_NEWLINK message a network converge compares; ``name_of`` maps ifindex -> name."""
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    summary = {
        "index": msg["index"],
        "kind": kind,
        "mtu": msg.get_attr("IFLA_MTU"),
        "up": bool(msg["flags"] & 1),
        "master": name_of(msg.get_attr("IFLA_MASTER")),
        "mac": msg.get_attr("IFLA_ADDRESS"),
    }
    if kind == "vxlan":
        data = info.get_attr("IFLA_INFO_DATA")
        summary["vxlan"] = {
            "id": data.get_attr("IFLA_VXLAN_ID"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL"),
            "link": name_of(data.get_attr("IFLA_VXLAN_LINK")),
            "port": data.get_attr("IFLA_VXLAN_PORT"),
        }
    elif kind == "bridge":
        data = info.get_attr("IFLA_INFO_DATA")
        summary["nf_call_iptables"] = bool(data and data.get_attr("IFLA_BR_NF_CALL_IPTABLES"))
    return summary
