# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fence: guest traffic never reaches what runs the cloud.

One nftables table per hypervisor, ``inet smallcloud_fence``, converged by the network module with every
network on the host and removed with the last one:

- input: nothing a guest network sends reaches the host itself, on any of its addresses (the underlay, the
  uplink, the host end of the egress links): not from an egress link ``ve-*`` (the path of every guest's
  routed traffic; only replies to connections the host opened pass) and not from a network's bridge ``br-*``
  (a guest that ARPs for a host address on its own segment);
- forward: routed guest traffic does not reach the control plane of the other hosts: the underlay addresses
  of every registered hypervisor and the etcd members the modules talk to (the set ``control``), except the
  replies to connections those hosts opened (another hypervisor probing a guest on its floating IP).

Guests keep DHCP and DNS (served in their network's namespace, not by the host), the outside through NAT, and
each other.
"""

import ipaddress
import json

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.netns_services import in_netns

TABLE = "smallcloud_fence"
# The links guest traffic arrives on (device_names: ``ve-<hex>`` egress host ends, ``br-<hex>`` bridges).
GUEST_LINKS = ("ve-*", "br-*")
INPUT_RULES = 3  # established from ve-*, drop ve-*, drop br-*
FORWARD_RULES = 2  # established from ve-* (replies to a hypervisor's own connection, e.g. to a floating IP)


def control_addresses(hosts, endpoints):
    """Sorted IPv4 addresses of the control plane: the registered hosts' underlays and the etcd members (by
    address; a member named by host name cannot be matched by address and is left out)."""
    found = {record.get("underlay_address") for record in hosts.values() if isinstance(record, dict)}
    found |= {endpoint.host for endpoint in endpoints}
    addresses = set()
    for text in found - {None}:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback:
            addresses.add(str(address))
    return sorted(addresses, key=ipaddress.ip_address)


def script(addresses):
    """The nft script that replaces the fence table in one transaction."""
    elements = "elements = { %s }" % ", ".join(addresses) if addresses else ""
    return "\n".join([
        "table inet %s" % TABLE,
        "delete table inet %s" % TABLE,
        "table inet %s {" % TABLE,
        "  set control { type ipv4_addr; %s }" % elements,
        "  chain input {",
        "    type filter hook input priority -10; policy accept;",
        '    iifname "ve-*" ct state established,related accept',
        '    iifname "ve-*" drop',
        '    iifname "br-*" drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority -10; policy accept;",
        '    iifname "ve-*" ct state established,related accept',
        '    iifname "ve-*" ip daddr @control drop',
        "  }",
        "}",
        "",
    ])


def observe(netns):
    """``{"control": [addresses], "input": rules, "forward": rules}`` of the fence in ``netns``, or None."""
    rc, out, _err = commands.run(in_netns(netns, ["nft", "-j", "list", "table", "inet", TABLE]), check=False)
    if rc != 0:
        return None
    seen = {"control": [], "input": 0, "forward": 0}
    for item in json.loads(out).get("nftables", []):
        if "set" in item and item["set"].get("name") == "control":
            seen["control"] = sorted((element for element in item["set"].get("elem", []) if isinstance(element, str)),
                                     key=ipaddress.ip_address)
        elif "rule" in item and item["rule"].get("chain") in ("input", "forward"):
            seen[item["rule"]["chain"]] += 1
    return seen


def wanted(addresses):
    return {"control": list(addresses), "input": INPUT_RULES, "forward": FORWARD_RULES}


def apply(netns, addresses):
    commands.run(in_netns(netns, ["nft", "-f", "-"]), input_text=script(addresses))


def remove(netns):
    if observe(netns) is not None:
        commands.run(in_netns(netns, ["nft", "delete", "table", "inet", TABLE]))
