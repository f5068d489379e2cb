# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Netlink requests with the standard library only: the reads a re-run makes on every host.

A re-converge with nothing to do only reads links, addresses, routes, FDB entries and nftables tables, on every
hypervisor, every run. pyroute2 costs about a fifth of a second of CPU to import (its package imports NDB,
asyncio, logging, unittest.mock), several times what those reads take; so they are made here, with ``socket``
and ``struct``, and pyroute2 is imported only by a run that changes links (netdev.NetDev's writes).
"""

import ctypes
import os
import socket
import struct

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
ATTRIBUTE = struct.Struct("=HH")  # nlattr: length, type
ATTRIBUTE_TYPE = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
RECEIVE_BYTES = 1 << 16  # the kernel sizes a dump's messages to what the reader asks for


class DumpInterrupted(Exception):
    """The kernel's dump raced with a change (NLM_F_DUMP_INTR): asking again is the documented answer."""


def attribute(kind, data):
    """One netlink attribute (type ``kind``, payload ``data``), padded to 4 bytes."""
    length = ATTRIBUTE.size + len(data)
    return ATTRIBUTE.pack(length, kind) + data + b"\0" * (-length % 4)


def attributes(data, offset=0):
    """``{type: payload}`` of the attributes in ``data`` from ``offset`` on (the first of a repeated type)."""
    found = {}
    while offset + ATTRIBUTE.size <= len(data):
        length, kind = ATTRIBUTE.unpack_from(data, offset)
        if length < ATTRIBUTE.size:
            break
        found.setdefault(kind & ATTRIBUTE_TYPE, data[offset + ATTRIBUTE.size:offset + length])
        offset += (length + 3) & ~3
    return found


def text(payload):
    """A NUL-terminated string attribute as str (None for a missing one)."""
    return None if payload is None else payload.split(b"\0", 1)[0].decode("utf-8", "replace")


def u32(payload):
    """A host-order 32-bit attribute (None for a missing one)."""
    return None if payload is None else struct.unpack_from("=I", payload)[0]


_LIBC = None


def setns(fd):
    """Move the calling thread into the namespace open at ``fd`` (Python 3.11 has no os.setns)."""
    global _LIBC  # noqa: PLW0603 - loaded once, on first use
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    if _LIBC.setns(fd, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def in_namespace(path, make):
    """What ``make()`` returns when called inside the network namespace at ``path`` (None: right here).

    Only the calling thread enters the namespace, and only for that call: a socket keeps the namespace it was
    made in, other threads (etcd lease keep-alives) are unaffected, and nothing forks.
    """
    if path is None:
        return make()
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target)
            try:
                return make()
            finally:
                setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


class Socket:
    """One netlink socket (``protocol``) in the namespace at ``netns_path``; requests answered in order."""

    def __init__(self, protocol, netns_path=None, strict=False):
        self.sock = in_namespace(netns_path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol))
        self.sequence = 0
        if strict:  # the kernel filters dumps by the request's header and attributes (Linux >= 4.20)
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            except OSError:
                self.sock.close()
                raise

    def close(self):
        self.sock.close()

    def request(self, kind, body, dump=False):
        """``[(type, payload)]`` the kernel answers to one request; OSError with the kernel's errno for an error,
        DumpInterrupted when a dump raced with a change."""
        self.sequence += 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        self.sock.send(HEADER.pack(HEADER.size + len(body), kind, flags, self.sequence, 0) + body)
        messages, interrupted = [], False
        while True:
            data = self.sock.recv(RECEIVE_BYTES)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, kind, flags, sequence, _port = HEADER.unpack_from(data, offset)
                payload = data[offset + HEADER.size:offset + length]
                offset += max((length + 3) & ~3, HEADER.size)
                if sequence != self.sequence:
                    continue  # the tail of an earlier request's answer
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code > 0:
                        raise OSError(code, os.strerror(code))
                    if interrupted:
                        raise DumpInterrupted()
                    return messages
                messages.append((kind, payload))
                if not flags & NLM_F_MULTI:
                    return messages


# nftables: one table, as ``nft list table`` would show its name, use count and comment ----------------------
NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE = 10, 1
NFTA_TABLE_NAME, NFTA_TABLE_USE, NFTA_TABLE_USERDATA = 1, 3, 6
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id


def get_table(family, name, netns_path=None):
    """``{attribute type: payload}`` of nftables table ``name`` of ``family`` (an NFPROTO_* number) in the namespace
    at ``netns_path`` (None: here), or None when there is no such table. OSError for another refusal."""
    body = NFGENMSG.pack(family, 0, 0) + attribute(NFTA_TABLE_NAME, name.encode() + b"\0")
    nft = Socket(NETLINK_NETFILTER, netns_path)
    try:
        answer = nft.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, body)
    except FileNotFoundError:  # ENOENT: no such table
        return None
    finally:
        nft.close()
    return attributes(answer[0][1], NFGENMSG.size) if answer else None


def table_use(table):
    """How many chains, sets and other objects a table (get_table's answer) holds, or None."""
    payload = table.get(NFTA_TABLE_USE)
    return struct.unpack(">I", payload)[0] if payload else None


def table_comment(table):
    """The comment in a table's user data (TLVs: type 0 is the comment, NUL-terminated), or ""."""
    data = bytes(table.get(NFTA_TABLE_USERDATA) or b"")
    while len(data) >= 2:
        kind, length = data[0], data[1]
        if kind == 0:
            return data[2:2 + length].rstrip(b"\0").decode("utf-8", "replace")
        data = data[2 + length:]
    return ""
