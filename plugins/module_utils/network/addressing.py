# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""IPv4 addressing of cloud networks: parsing with errors that name the option, and which addresses a
network hands out (the first is its gateway, the last its broadcast)."""

import ipaddress

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
MAX_PREFIXLEN = 29  # network, gateway, broadcast and at least a few guests


def parse_cidr(cidr, option="cidr", max_prefixlen=MAX_PREFIXLEN):
    """An IPv4Network from ``cidr``; InvalidInput naming the value when it is not a usable IPv4 CIDR."""
    try:
        network = ipaddress.ip_network(str(cidr), strict=True)
    except ValueError as error:
        raise InvalidInput("%s %r is not a valid IPv4 network (e.g. 10.0.0.0/24): %s" % (option, cidr, error),
                           **{option: cidr}) from error
    if network.version != 4:
        raise InvalidInput("%s %r is not IPv4; only IPv4 networks are supported" % (option, cidr), **{option: cidr})
    if network.prefixlen > max_prefixlen:
        raise InvalidInput(
            "%s %s is too small to hold a gateway and guests: use a prefix length of at most /%d"
            % (option, cidr, max_prefixlen), **{option: cidr, "max_prefixlen": max_prefixlen})
    return network


def parse_address(value, option):
    """An IPv4Address from ``value``; InvalidInput naming ``option`` otherwise."""
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        address = None
    if address is None or address.version != 4:
        raise InvalidInput("%s %r is not an IPv4 address" % (option, value), **{option: value})
    return address


def first_usable(pool):
    """The lowest address handed out from ``pool`` (the one after the gateway)."""
    return pool.network_address + 2


def check_usable(pool, address, option, where=None, subject=""):
    """Raise InvalidInput unless ``address`` is one ``pool`` hands out (not network, gateway or broadcast).

    ``where`` names the pool in the message (default the pool itself), ``subject`` what the option belongs to
    (``"instance web1: "``); the error's details name the value under ``option``.
    """
    address = ipaddress.ip_address(str(address))
    if address not in pool or address in (pool.network_address, pool.network_address + 1, pool.broadcast_address):
        raise InvalidInput("%s%s %s is not a usable address of %s (allowed %s..%s)"
                           % (subject, option, address, where or pool, first_usable(pool), pool.broadcast_address - 1),
                           **{option: str(address)})


def gateway_facts(network):
    """Gateway address (first host, with prefix) and the DHCP range of ``network``."""
    return {
        "gateway_ip": str(network.network_address + 1),
        "gateway_cidr": "%s/%d" % (network.network_address + 1, network.prefixlen),
        "dhcp_range": "%s-%s" % (first_usable(network), network.broadcast_address - 1),
    }
