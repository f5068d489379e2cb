# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Links, bridge, VXLAN, FDB, addresses and routes in one network namespace.

``NetDev(netns)`` works in the named namespace (``None``: the caller's own namespace, the host's root namespace
on a hypervisor). It reads over rtnetlink with the standard library (network/netlink.py) and changes things
through pyroute2, imported by the first change: a re-run that finds everything in place never imports it.
Every method raises HostError naming the interface on failure.
"""

import errno
import importlib.util
import os
import socket
import struct

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, MissingLibrary
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netlink

# Looked for here, imported by the first change (load_pyroute2): see the module's docstring.
HAS_PYROUTE2 = importlib.util.find_spec("pyroute2") is not None
IPRoute = None


class NetlinkError(Exception):
    """pyroute2's NetlinkError once pyroute2 is loaded; until then nothing can raise it."""


ZERO_MAC = "00:00:00:00:00:00"
VXLAN_PORT = 4789
IFNAMSIZ = 15
DUMP_RETRIES = 10

# rtnetlink (linux/rtnetlink.h, if_link.h, if_addr.h, neighbour.h): the messages and attributes read here.
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETNEIGH = 18, 22, 26, 30
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, index, state, flags, type
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO = 1, 3, 4, 10, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL, IFLA_VXLAN_PORT = 1, 3, 4, 15
IFLA_BR_NF_CALL_IPTABLES = 36
IFA_ADDRESS = 1
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
AF_BRIDGE, MAIN_TABLE, IFF_UP = 7, 254, 1


def require_pyroute2():
    """Raise MissingLibrary unless pyroute2 is installed."""
    if not HAS_PYROUTE2:
        raise MissingLibrary("pyroute2 is required on the managed host (Debian: python3-pyroute2)", library="pyroute2")


def load_pyroute2():
    """Import pyroute2's IPRoute and NetlinkError once (the module-level names)."""
    global IPRoute, NetlinkError  # noqa: PLW0603 - bound on first use, see HAS_PYROUTE2
    require_pyroute2()
    if IPRoute is None:
        from pyroute2 import IPRoute as iproute  # noqa: PLC0415 - see HAS_PYROUTE2
        from pyroute2.netlink.exceptions import NetlinkError as netlink_error  # noqa: PLC0415

        IPRoute, NetlinkError = iproute, netlink_error


class NetDev:
    """A netlink handle on one namespace; use as a context manager."""

    def __init__(self, netns=None, netns_dir="/run/netns"):
        require_pyroute2()
        self.netns = netns
        self.path = os.path.join(netns_dir, netns) if netns else None
        self._ipr = None
        self._strict = None
        try:
            self.rtnl = netlink.Socket(netlink.NETLINK_ROUTE, self.path)
        except OSError as error:
            raise HostError("cannot open network namespace %s: %s" % (netns, error), netns=netns) from error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the netlink sockets."""
        for opened in (self.rtnl, self._ipr, self._strict):
            if opened is not None:
                opened.close()

    @property
    def ipr(self):
        """pyroute2's IPRoute in this namespace, for changes; opened (and pyroute2 imported) on first use."""
        if self._ipr is None:
            load_pyroute2()
            self._ipr = netlink.in_namespace(self.path, IPRoute)
        return self._ipr

    def _call(self, what, function, *args, **kwargs):
        """Run one pyroute2 change (no dump: reads go through _read); NetlinkError becomes HostError naming
        ``what``."""
        try:
            return function(*args, **kwargs)
        except NetlinkError as error:
            raise HostError("%s failed in namespace %s: %s" % (what, self.netns or "(root)", error),
                            netns=self.netns) from error

    def _read(self, what, kind, body, dump=True, sock=None):
        """``[(type, payload)]`` of one rtnetlink read, a dump asked again when it raced with a change; HostError
        naming ``what`` on a refusal."""
        for attempt in range(DUMP_RETRIES):
            try:
                return (sock or self.rtnl).request(kind, body, dump=dump)
            except netlink.DumpInterrupted:
                if attempt + 1 == DUMP_RETRIES:
                    raise HostError("%s in namespace %s: the dump was interrupted %d times"
                                    % (what, self.netns or "(root)", DUMP_RETRIES), netns=self.netns) from None
            except OSError as error:
                raise HostError("%s failed in namespace %s: %s" % (what, self.netns or "(root)", error),
                                netns=self.netns) from error
        return []  # not reached

    # links -----------------------------------------------------------------------------------

    def index(self, name):
        """The ifindex of ``name``, or None."""
        found = self._get_link(name=name)
        return found["index"] if found else None

    def links(self):
        """``{name: summary}`` of every link: kind, index, mtu, up, master (name), vxlan settings."""
        found = self._dump_links()
        names = {link["index"]: link["name"] for link in found}
        return {link["name"]: _summary(link, names.get) for link in found}

    def link(self, name):
        """The summary of link ``name`` (see links()), or None; asks for that one link only."""
        found = self._get_link(name=name)
        return _summary(found, self._name_of) if found is not None else None

    def _dump_links(self):
        return [_link(payload) for _kind, payload in
                self._read("listing links", RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]

    def _get_link(self, name=None, index=None):
        """One link (``_link``) by name or index, or None when there is no such link."""
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index or 0, 0, 0)
        if name is not None:
            if len(name.encode()) > IFNAMSIZ:  # the kernel refuses such a name (EINVAL): no link can have it
                return None
            body += netlink.attribute(IFLA_IFNAME, name.encode() + b"\0")
        try:
            answer = self.rtnl.request(RTM_GETLINK, body)
        except OSError as error:
            if error.errno == errno.ENODEV:
                return None
            what = name or index
            raise HostError("looking up link %s failed in namespace %s: %s" % (what, self.netns or "(root)", error),
                            netns=self.netns) from error
        return _link(answer[0][1]) if answer else None

    def _name_of(self, index):
        """The name of the link with ``index`` (None for none)."""
        if not index:
            return None
        found = self._get_link(index=index)
        return found["name"] if found is not None else None

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
        found = []
        for _kind, payload in self._read("listing addresses of %s" % name, RTM_GETADDR,
                                         IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
            family, prefix, _flags, _scope, owner = IFADDRMSG.unpack_from(payload)
            address = netlink.attributes(payload, IFADDRMSG.size).get(IFA_ADDRESS)
            if family == socket.AF_INET and owner == index and address:
                found.append("%s/%d" % (socket.inet_ntoa(address), prefix))
        return sorted(found)

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
        names = {link["index"]: link["name"] for link in self._dump_links()}
        out = []
        for _kind, payload in self._read("listing routes", RTM_GETROUTE, RTMSG.pack(socket.AF_INET, *[0] * 8)):
            fields = RTMSG.unpack_from(payload)
            found = netlink.attributes(payload, RTMSG.size)
            table = netlink.u32(found.get(RTA_TABLE)) or fields[4]
            if fields[0] != socket.AF_INET or table != MAIN_TABLE:
                continue
            dst = "%s/%d" % (_ipv4(found.get(RTA_DST)) or "0.0.0.0", fields[1])  # noqa: S104 - a route, not a bind
            out.append((dst, _ipv4(found.get(RTA_GATEWAY)), names.get(netlink.u32(found.get(RTA_OIF)))))
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
        for _kind, payload in self._fdb_dump(name, index):
            owner = NDMSG.unpack_from(payload)[1]
            found = netlink.attributes(payload, NDMSG.size)
            if owner == index and _mac(found.get(NDA_LLADDR)) == ZERO_MAC and found.get(NDA_DST):
                peers.add(_ip(found[NDA_DST]))
        return sorted(peers)

    def _fdb_dump(self, name, index):
        """FDB entries of one port, filtered by the kernel (strict checking + NDA_IFINDEX); a kernel without
        strict dump checking (< 4.20) dumps every entry of the namespace, filtered by the caller."""
        what = "listing FDB of %s" % name
        if self._strict is None:
            try:
                self._strict = netlink.Socket(netlink.NETLINK_ROUTE, self.path, strict=True)
            except OSError:
                self._strict = False
        if self._strict:
            return self._read(what, RTM_GETNEIGH, NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)
                              + netlink.attribute(NDA_IFINDEX, struct.pack("=I", index)), sock=self._strict)
        return self._read(what, RTM_GETNEIGH, NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0))

    def add_fdb_peer(self, name, peer):
        """Flood broadcast/unknown traffic of ``name`` to ``peer`` too (head-end replication)."""
        self._call("adding FDB peer %s to %s" % (peer, name), self.ipr.fdb, "append", ifindex=self.index(name),
                   lladdr=ZERO_MAC, dst=peer)

    def del_fdb_peer(self, name, peer):
        """Stop flooding ``name``'s traffic to ``peer``."""
        self._call("removing FDB peer %s from %s" % (peer, name), self.ipr.fdb, "del", ifindex=self.index(name),
                   lladdr=ZERO_MAC, dst=peer)


def _ipv4(payload):
    return socket.inet_ntoa(payload) if payload and len(payload) == 4 else None


def _ip(payload):
    return socket.inet_ntop(socket.AF_INET if len(payload) == 4 else socket.AF_INET6, payload)


def _mac(payload):
    return ":".join("%02x" % byte for byte in payload) if payload else None


def _link(payload):
    """An RTM_NEWLINK message as ``{"index", "flags", "name", "attrs", "info": {kind, data}}``."""
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(payload)
    found = netlink.attributes(payload, IFINFOMSG.size)
    info = netlink.attributes(found[IFLA_LINKINFO]) if IFLA_LINKINFO in found else {}
    return {"index": index, "flags": flags, "name": netlink.text(found.get(IFLA_IFNAME)), "attrs": found,
            "kind": netlink.text(info.get(IFLA_INFO_KIND)),
            "data": netlink.attributes(info[IFLA_INFO_DATA]) if IFLA_INFO_DATA in info else {}}


def _summary(link, name_of):
    """The parts of a link a network converge compares; ``name_of`` maps ifindex -> name."""
    found, data, kind = link["attrs"], link["data"], link["kind"]
    summary = {
        "index": link["index"],
        "kind": kind,
        "mtu": netlink.u32(found.get(IFLA_MTU)),
        "up": bool(link["flags"] & IFF_UP),
        "master": name_of(netlink.u32(found.get(IFLA_MASTER))),
        "mac": _mac(found.get(IFLA_ADDRESS)),
    }
    if kind == "vxlan":
        port = data.get(IFLA_VXLAN_PORT)
        summary["vxlan"] = {
            "id": netlink.u32(data.get(IFLA_VXLAN_ID)),
            "local": _ipv4(data.get(IFLA_VXLAN_LOCAL)),
            "link": name_of(netlink.u32(data.get(IFLA_VXLAN_LINK))),
            "port": struct.unpack(">H", port)[0] if port else None,
        }
    elif kind == "bridge":
        summary["nf_call_iptables"] = bool(data.get(IFLA_BR_NF_CALL_IPTABLES, b"\0")[0])
    return summary
