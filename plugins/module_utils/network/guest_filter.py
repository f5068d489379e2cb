# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Security groups on a hypervisor: one nftables table, ``inet smallcloud_guests``, for the guests it runs.

The instance module converges it with the host's instances, from the records in etcd: the guests recorded on
this host, their interfaces (network, bridge, address) and their groups (network.security_groups). So the
rules follow a guest to whichever host runs it, and a changed group reaches every host with its next converge,
without touching a guest.

The bridges pass their IPv4 traffic through the inet hooks (``nf_call_iptables``, set by the network module),
where conntrack makes the rules stateful; a bridged packet's ``iifname``/``oifname`` is the bridge, not the
guest's port, so a guest is matched by its bridge and its address. Per guest interface:

- ingress (``in-NAME-N``): replies to what the guest opened, traffic from its own network (DHCP, DNS, the
  other guests), and what its groups' ingress rules allow; everything else is dropped. No group: only those
  defaults, so a floating IP answers nothing until a group opens a port.
- egress (``out-NAME-N``, only when a group of the guest has egress rules): its own network plus those
  rules. With no egress rule in any of its groups a guest's egress is open.

Allowed traffic ``return``s from a guest's chain rather than accepting, so a packet between two guests of
this host passes the sender's egress and the receiver's ingress both.

The table's comment carries a digest of what it was made from and its chain count, so a re-run that finds both
unchanged reads the table with one netlink request and runs no command.
"""

import hashlib
import json
import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netlink
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.security_groups import ANYWHERE
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records

TABLE = "smallcloud_guests"
NFPROTO_INET = 1
COMMENT_PREFIX = "smallcloud"


# what the table is made from -------------------------------------------------------------------------


def guests_on(instances, host):
    """``{name: record}`` of the instances recorded on ``host``, or moving to it (an evacuation starts the guest
    on its target before the record moves there)."""
    return {name: record for name, record in sorted(instances.items())
            if isinstance(record, dict) and host in (record.get("host"), record.get("moving_to"))}


def inputs(guests, instances, groups):
    """Everything the table depends on, in a canonical shape: per guest its interfaces and groups, the rules of
    those groups, and the addresses of every group a rule names as its remote side."""
    used = sorted({group for record in guests.values() for group in record.get("security_groups") or []})
    rules = {group: (groups.get(group) or {}).get("rules") or [] for group in used}
    remote = sorted({rule["group"] for group in used for rule in rules[group] if rule.get("group")})
    return {
        "guests": [{"name": name, "groups": list(record.get("security_groups") or []),
                    "interfaces": [{"network": nic.get("network"), "ip": nic.get("ip"),
                                    "bridge": (record.get("bridges") or {}).get(nic.get("network"))}
                                   for nic in record.get("interfaces") or [] if nic.get("ip")]}
                   for name, record in guests.items()],
        "rules": rules,
        "members": {group: members_of(group, instances) for group in remote},
    }


def members_of(group, instances):
    """Sorted addresses of every interface of the instances in ``group``, on any host."""
    return sorted({nic["ip"] for record in instances.values() if isinstance(record, dict)
                   and group in (record.get("security_groups") or [])
                   for nic in record.get("interfaces") or [] if nic.get("ip")})


def digest(made_from):
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:20]


# the nft script -----------------------------------------------------------------------------------------


def rule_match(rule):
    """The nft match of one recorded rule, from the guest's point of view (empty: everything)."""
    side = "saddr" if rule["direction"] == "ingress" else "daddr"
    parts = []
    if rule.get("group"):
        parts.append("ip %s @grp-%s" % (side, rule["group"]))
    elif rule.get("cidr") and rule["cidr"] != ANYWHERE:
        parts.append("ip %s %s" % (side, rule["cidr"]))
    if rule["protocol"] in ("tcp", "udp") and rule.get("ports"):
        parts.append("%s dport %s" % (rule["protocol"], rule["ports"]))
    elif rule["protocol"] != "any":
        parts.append("meta l4proto %s" % rule["protocol"])
    return " ".join(parts)


def guest_chains(guest, rules, cidrs):
    """``[(chain, [rule text], (hook match))]`` of one guest: its ingress chain per interface, and its egress
    chain when one of its groups has egress rules."""
    chains = []
    mine = [rule for group in guest["groups"] for rule in rules.get(group, [])]
    egress = [rule for rule in mine if rule["direction"] == "egress"]
    for index, nic in enumerate(guest["interfaces"]):
        own = cidrs.get(nic["network"])
        same = ["ip saddr %s return" % own] if own else []
        allowed = ["%s return" % rule_match(rule) if rule_match(rule) else "return"
                   for rule in mine if rule["direction"] == "ingress"]
        chains.append(("in-%s-%d" % (guest["name"], index), [*same, *allowed, "drop"],
                       'oifname "%s" ip daddr %s' % (nic["bridge"], nic["ip"])))
        if egress:
            same = ["ip daddr %s return" % own] if own else []
            allowed = ["%s return" % rule_match(rule) if rule_match(rule) else "return" for rule in egress]
            chains.append(("out-%s-%d" % (guest["name"], index), [*same, *allowed, "drop"],
                           'iifname "%s" ip saddr %s' % (nic["bridge"], nic["ip"])))
    return chains


def script(made_from, cidrs):
    """``(nft script, object count)``: the script that replaces the table in one transaction."""
    chains = [chain for guest in made_from["guests"] for chain in guest_chains(guest, made_from["rules"], cidrs)]
    dispatch = ["ct state established,related accept"]
    # Egress first: a packet between two guests here is checked by both chains before it is accepted.
    dispatch += ["%s jump %s" % (match, name) for name, _rules, match in chains if name.startswith("out-")]
    dispatch += ["%s jump %s" % (match, name) for name, _rules, match in chains if name.startswith("in-")]
    # What the kernel's use count of the table says: forward, the guests' chains and the remote groups' sets.
    count = 1 + len(chains) + len(made_from["members"])
    lines = ["table inet %s" % TABLE, "delete table inet %s" % TABLE, "table inet %s {" % TABLE,
             '  comment "%s %s objects %d"' % (COMMENT_PREFIX, digest(made_from), count)]
    for group, members in sorted(made_from["members"].items()):
        elements = " elements = { %s };" % ", ".join(members) if members else ""
        lines.append("  set grp-%s { type ipv4_addr;%s }" % (group, elements))
    lines += ["  chain forward {", "    type filter hook forward priority 0; policy accept;"]
    lines += ["    " + line for line in dispatch] + ["  }"]
    for name, rules, _match in chains:
        lines += ["  chain %s {" % name] + ["    " + line for line in rules] + ["  }"]
    return "\n".join([*lines, "}", ""]), count


# the host -----------------------------------------------------------------------------------------------


def observe():
    """``{"digest", "objects"}`` of the table on this host as its comment records them, and ``"counted"``, the
    chains and sets it holds; None without the table. One netlink request, no command, nothing imported."""
    try:
        table = netlink.get_table(NFPROTO_INET, TABLE)
    except OSError as error:
        raise HostError("reading nft table inet %s failed: %s" % (TABLE, error)) from error
    if table is None:
        return None
    counted = netlink.table_use(table)
    words = netlink.table_comment(table).split()
    if len(words) == 4 and words[0] == COMMENT_PREFIX and words[2] == "objects" and words[3].isdigit():
        return {"digest": words[1], "objects": int(words[3]), "counted": counted}
    return {"digest": None, "objects": None, "counted": counted}


def apply(text, proc_root="/proc"):
    """Replace the table; HostError when bridged traffic would not reach it (no br_netfilter)."""
    if not os.path.isdir(os.path.join(proc_root, "sys", "net", "bridge")):
        raise HostError("security groups cannot be enforced on this host: bridged traffic bypasses nftables "
                        "without the br_netfilter kernel module (modprobe br_netfilter; the hypervisor role loads it)")
    commands.run(["nft", "-f", "-"], input_text=text)


def remove():
    commands.run(["nft", "delete", "table", "inet", TABLE])


def plan(target, host, instances, read_groups, read_networks):
    """Queue on Plan ``target`` what makes this host's table match the records ``instances``.

    ``read_groups()`` and ``read_networks()`` read etcd; each is called only when needed (a guest in a group;
    a table to write), so a re-run with nothing to change asks etcd nothing more.
    """
    guests = guests_on(instances, host)
    seen = observe()
    if not guests:
        if seen is not None:
            target.compare("guest_filter", "%s chains and sets" % seen["counted"], None)
            target.add("delete nft table inet %s (no guest on this host)" % TABLE, remove)
        return
    in_groups = any(record.get("security_groups") for record in guests.values())
    made_from = inputs(guests, instances, read_groups() if in_groups else {})
    wanted = digest(made_from)
    if seen is not None and seen["digest"] == wanted and seen["objects"] == seen["counted"]:
        return
    cidrs = {name: record.get("cidr") for name, record in read_networks().items() if isinstance(record, dict)}
    text, count = script(made_from, cidrs)
    target.compare("guest_filter", seen and "%s (%s chains and sets)" % (seen["digest"], seen["counted"]),
                   "%s (%d chains and sets)" % (wanted, count))
    target.add("write nft table inet %s (%d guests, %d chains and sets)" % (TABLE, len(guests), count), apply,
               text)


def converge_now(host, store):
    """Make the table on ``host`` (this host) match the records in ``store`` as they are now; outside a module's
    plan (a guest about to start, an evacuation's import and cleanup)."""
    now = Plan()
    plan(now, host, records.instances(store), lambda: records.security_groups(store), lambda: records.networks(store))
    now.apply(False)
