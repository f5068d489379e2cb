# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pure logic behind the allocators: value ranges, address arithmetic, MAC format, picking a free value.

Nothing here talks to etcd; ``store.Store`` reads the taken set, asks ``pick_free`` for a candidate and
claims it with one create-if-absent transaction.
"""

import ipaddress
import random
import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

VNI_MIN = 1
VNI_MAX = 16777215  # 24-bit VXLAN network identifier
MAC_PREFIX = "02:73:63"  # locally administered (0x02 bit) unicast; 0x73 0x63 is "sc" in ASCII
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_SAMPLE_TRIES = 32

SYSTEM_RANDOM = random.SystemRandom()  # os.urandom: forked workers never share a sequence


def pick_free(size, taken, rng=SYSTEM_RANDOM):
    """A random offset in ``0..size-1`` not in the set ``taken``; None when every offset is taken.

    Samples while the pool is mostly free (cheap for a /8 or the VNI space); lists the free
    offsets once sampling misses, which only happens when ``taken`` is already large.
    """
    if len(taken) >= size:
        return None
    for _attempt in range(_SAMPLE_TRIES):
        offset = rng.randrange(size)
        if offset not in taken:
            return offset
    free = [offset for offset in range(size) if offset not in taken]
    return rng.choice(free) if free else None


def check_vni(vni):
    """``vni`` as an int in VNI_MIN..VNI_MAX, else InvalidInput naming it."""
    try:
        number = int(vni)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(vni, bool) or str(number) != str(vni).strip() or not VNI_MIN <= number <= VNI_MAX:
        allowed = "an integer in %d..%d" % (VNI_MIN, VNI_MAX)
        raise InvalidInput("VNI %r is not valid; expected %s" % (vni, allowed), vni=vni, allowed=allowed)
    return number


def random_mac(rng=SYSTEM_RANDOM):
    """A random MAC address under MAC_PREFIX."""
    low = rng.randrange(1 << 24)
    return "%s:%02x:%02x:%02x" % (MAC_PREFIX, low >> 16, (low >> 8) & 0xFF, low & 0xFF)


def normalize_mac(mac):
    """``mac`` as lower-case ``aa:bb:cc:dd:ee:ff``; InvalidInput unless a unicast MAC."""
    allowed = "six hex octets like 02:73:63:0a:0b:0c (':' or '-' separated or none), unicast"
    text = mac.strip().lower() if isinstance(mac, str) else ""
    if not _MAC_RE.match(text):
        raise InvalidInput("MAC address %r is not valid; expected %s" % (mac, allowed), mac=mac, allowed=allowed)
    digits = re.sub(r"[:-]", "", text)
    if int(digits[:2], 16) & 0x01:
        raise InvalidInput(
            "MAC address %r is a multicast address; expected %s" % (mac, allowed), mac=mac, allowed=allowed
        )
    return ":".join(digits[index : index + 2] for index in range(0, 12, 2))


def normalize_ipv4(address):
    """``address`` as a canonical IPv4 string; InvalidInput naming it otherwise."""
    try:
        return str(ipaddress.IPv4Address(address.strip() if isinstance(address, str) else address))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise InvalidInput("address %r is not an IPv4 address" % (address,), address=address) from None


def pool_key(cidr):
    """The key segment for a CIDR: ``10.0.0.0/24`` -> ``10.0.0.0_24`` (a key segment has no '/')."""
    return str(AddressPool(cidr).network).replace("/", "_")


class AddressPool:
    """The assignable IPv4 addresses of a CIDR: every host but the network, gateway and broadcast addresses.

    The gateway is the first host address (``.1`` of a /24). Offsets number the assignable
    addresses from 0, so ``pick_free`` can choose among them.
    """

    def __init__(self, cidr, what="CIDR"):
        allowed = "an IPv4 network in CIDR notation with host bits zero, /30 or larger, like 10.0.0.0/24"
        try:
            network = ipaddress.IPv4Network(cidr.strip() if isinstance(cidr, str) else cidr, strict=True)
        except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError, TypeError) as error:
            raise InvalidInput(
                "%s %r is not valid (%s); expected %s" % (what, cidr, error, allowed), cidr=cidr, allowed=allowed
            ) from None
        if network.prefixlen > 30:
            raise InvalidInput(
                "%s %s has no assignable address; expected %s" % (what, network, allowed), cidr=cidr, allowed=allowed
            )
        self.network = network
        self.gateway = network.network_address + 1
        self._first = int(network.network_address) + 2
        self.size = network.num_addresses - 3  # network, gateway, broadcast

    def address(self, offset):
        """The address at ``offset`` as a string."""
        return str(ipaddress.IPv4Address(self._first + offset))

    def offset(self, address):
        """The offset of ``address`` (string), or None when it is not assignable in this pool."""
        try:
            number = int(ipaddress.IPv4Address(address))
        except (ipaddress.AddressValueError, ValueError, TypeError):
            return None
        offset = number - self._first
        return offset if 0 <= offset < self.size else None

    def offsets(self, addresses):
        """The set of offsets of those ``addresses`` that are assignable here (strays are ignored)."""
        found = set()
        for address in addresses:
            offset = self.offset(address)
            if offset is not None:
                found.add(offset)
        return found

    def check(self, address):
        """``address`` normalised, else InvalidInput saying which addresses are allowed."""
        offset = self.offset(address.strip() if isinstance(address, str) else address)
        if offset is None:
            allowed = "%s..%s (not the network, gateway %s or broadcast address)" % (
                self.address(0),
                self.address(self.size - 1),
                self.gateway,
            )
            raise InvalidInput(
                "address %r cannot be assigned in %s; allowed: %s" % (address, self.network, allowed),
                address=address,
                allowed=allowed,
            )
        return self.address(offset)
