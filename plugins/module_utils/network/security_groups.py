# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``security_group`` module: named rule sets in etcd, which instances take by name.

etcd: ``security_groups/NAME`` = ``{"name", "description", "rules": [rule]}``, each rule normalized to
``{"direction": "ingress"|"egress", "protocol": "tcp"|"udp"|"icmp"|"any", "ports": "22"|"8000-8080"|None,
"cidr": "a.b.c.d/n"|None, "group": NAME|None}`` (exactly one of ``cidr`` and ``group``: the remote side, the
source of ingress or the destination of egress; ``group`` means every address of that group's members).

The rules are enforced on each hypervisor by ``network.guest_filter`` (the instance module converges it with
the host's instances), so a change here reaches a host with its next converge, without restarting a guest.
"""

import ipaddress

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

DIRECTIONS = ("ingress", "egress")
PROTOCOLS = ("tcp", "udp", "icmp", "any")
PORTED = ("tcp", "udp")
MAX_RULES = 100
ANYWHERE = "0.0.0.0/0"

RULE_OPTIONS = dict(
    direction=dict(type="str", default="ingress", choices=list(DIRECTIONS)),
    protocol=dict(type="str", default="any", choices=list(PROTOCOLS)),
    port=dict(type="raw"),
    cidr=dict(type="str"),
    group=dict(type="str"),
)

# plugins/modules/security_group.py documents exactly these.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            description=dict(type="str", default=""),
            rules=dict(type="list", elements="dict", default=[], options=RULE_OPTIONS,
                       mutually_exclusive=[("cidr", "group")]),
        ),
        ETCD_ARGS,
    ),
    supports_check_mode=True,
)


# rules --------------------------------------------------------------------------------------------


def parse_ports(value, protocol, where):
    """``"22"`` or ``"8000-8080"`` from ``22``, ``"22"`` or ``"8000-8080"``; None for no port."""
    if value is None or value == "":
        return None
    if protocol not in PORTED:
        raise InvalidInput("%s: port %r needs protocol tcp or udp, not %s" % (where, value, protocol),
                           port=value, protocol=protocol, allowed=list(PORTED))
    text = str(value).strip()
    low, _sep, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        first = last = None
    if isinstance(value, bool) or first is None or not 1 <= first <= last <= 65535:
        raise InvalidInput("%s: port %r is not valid: allowed a port 1..65535 or a range FIRST-LAST within it"
                           % (where, value), port=value, allowed="1..65535 or FIRST-LAST")
    return str(first) if first == last else "%d-%d" % (first, last)


def parse_remote_cidr(value, where):
    """The normalized IPv4 network of ``value`` (host bits must be zero)."""
    try:
        network = ipaddress.ip_network(str(value), strict=True)
    except ValueError as error:
        raise InvalidInput("%s: cidr %r is not an IPv4 network (e.g. 192.0.2.0/24 or 0.0.0.0/0): %s"
                           % (where, value, error), cidr=value) from error
    if network.version != 4:
        raise InvalidInput("%s: cidr %r is not IPv4; only IPv4 is filtered" % (where, value), cidr=value)
    return str(network)


def check_group_name(name, where):
    try:
        return check_name("security group", name)
    except InvalidInput as error:
        raise InvalidInput("%s: %s" % (where, error.msg), **error.details) from error


def normalize_rule(rule, where):
    """One rule as recorded: every key present, the remote side ``cidr`` (default anywhere) or ``group``."""
    protocol = rule.get("protocol") or "any"
    direction = rule.get("direction") or "ingress"
    if protocol not in PROTOCOLS or direction not in DIRECTIONS:
        raise InvalidInput("%s: direction %r / protocol %r not allowed: direction one of %s, protocol one of %s"
                           % (where, direction, protocol, list(DIRECTIONS), list(PROTOCOLS)),
                           direction=direction, protocol=protocol)
    if rule.get("cidr") and rule.get("group"):
        raise InvalidInput("%s: give cidr or group, not both (cidr %r, group %r)"
                           % (where, rule["cidr"], rule["group"]), cidr=rule["cidr"], group=rule["group"])
    group = check_group_name(rule["group"], where) if rule.get("group") else None
    return {
        "direction": direction, "protocol": protocol, "ports": parse_ports(rule.get("port"), protocol, where),
        "cidr": None if group else parse_remote_cidr(rule.get("cidr") or ANYWHERE, where), "group": group,
    }


def normalize_rules(name, rules):
    """The rules of group ``name`` as recorded, in the given order, duplicates dropped."""
    if len(rules or []) > MAX_RULES:
        raise InvalidInput("security group %s has %d rules; at most %d are allowed" % (name, len(rules), MAX_RULES),
                           rules=len(rules), allowed=MAX_RULES)
    normalized = []
    for index, rule in enumerate(rules or []):
        item = normalize_rule(rule, "security group %s rule %d" % (name, index + 1))
        if item not in normalized:
            normalized.append(item)
    return normalized


def check_references(name, rules, groups):
    """Every group a rule names exists (or is the group itself)."""
    for rule in rules:
        if rule["group"] and rule["group"] != name and rule["group"] not in groups:
            raise InvalidInput("security group %s: rule names group %r, which does not exist; existing groups: %s"
                               % (name, rule["group"], sorted(groups) or "none"), group=rule["group"],
                               allowed=sorted(groups))


def users_of(name, groups, instances):
    """``(instances, groups)``: the names of the instances in group ``name`` and of the other groups whose rules
    name it, each sorted."""
    members = sorted(instance for instance, record in instances.items()
                     if isinstance(record, dict) and name in (record.get("security_groups") or []))
    referring = sorted(group for group, record in groups.items() if group != name and isinstance(record, dict)
                       and any(rule.get("group") == name for rule in record.get("rules") or []))
    return members, referring


# the module ---------------------------------------------------------------------------------------


def run(module):
    """Entry point for run_module: the group's record made to match, or removed."""
    params = module.params
    name = check_name("security group", params["name"])
    store = Store.from_params(params)
    plan = Plan()
    seen = store.get_with_revision(records.security_group_key(name))
    if params["state"] == "absent":
        after = plan_absent(plan, store, name, seen)
    else:
        rules = normalize_rules(name, params["rules"])
        if any(rule["group"] and rule["group"] != name for rule in rules):
            check_references(name, rules, records.security_groups(store))
        want = {"name": name, "description": params["description"] or "", "rules": rules}
        after = plan_present(plan, store, name, seen, want)
    plan.apply(module.check_mode)
    return plan.result(security_group=after)


def plan_present(plan, store, name, seen, want):
    """Queue the one write that makes the record ``want``; the record after. ``seen``: (record, revision)."""
    current, revision = seen
    if plan.compare("security_group", current, want):
        verb = "create" if current is None else "update"
        plan.add("%s security group %s (%d rules)" % (verb, name, len(want["rules"])), write_record, store, name,
                 revision, want)
    return want


def write_record(store, name, revision, want):
    """Write the record if nobody changed it since it was read; another run that wrote the same is fine."""
    key = records.security_group_key(name)
    if store.compare_and_swap(key, revision, want):
        return
    if store.get(key) != want:
        raise Conflict("security group %s was changed by another run meanwhile; run again" % name, name=name)


def plan_absent(plan, store, name, seen):
    """Queue the deletion, refused while an instance is in the group or another group's rules name it."""
    current, revision = seen
    if current is None:
        return None
    members, referring = users_of(name, records.security_groups(store), records.instances(store))
    if members or referring:
        raise Conflict("security group %s is still used: instances %s, rules of groups %s; remove those first"
                       % (name, members or "none", referring or "none"), name=name, instances=members,
                       groups=referring)
    plan.compare("security_group", current, None)
    plan.add("delete security group %s" % name, store.delete, records.security_group_key(name), revision)
    return None
