"""Security groups without a host: rules validated and normalized, the guest filter's nft script built from
records (and accepted by ``nft -c``), and what the table is made from (a digest that changes with it)."""

import shutil
import subprocess

import pytest
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import guest_filter, netlink
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.security_groups import (
    check_references,
    normalize_rules,
    users_of,
)

pytestmark = pytest.mark.unit


def rule(**given):
    return dict({"direction": None, "protocol": None, "port": None, "cidr": None, "group": None}, **given)


def test_rules_are_normalized_with_defaults_and_duplicates_dropped():
    rules = normalize_rules("web", [rule(protocol="tcp", port=80), rule(protocol="tcp", port="80"),
                                    rule(protocol="udp", port="1000-2000", cidr="10.0.0.0/8"),
                                    rule(direction="egress", group="db")])
    assert rules == [
        {"direction": "ingress", "protocol": "tcp", "ports": "80", "cidr": "0.0.0.0/0", "group": None},
        {"direction": "ingress", "protocol": "udp", "ports": "1000-2000", "cidr": "10.0.0.0/8", "group": None},
        {"direction": "egress", "protocol": "any", "ports": None, "cidr": None, "group": "db"},
    ]


@pytest.mark.parametrize(("given", "named", "allowed"), [
    (rule(protocol="tcp", port=70000), "70000", "1..65535"),
    (rule(protocol="tcp", port="90-80"), "90-80", "FIRST-LAST"),
    (rule(protocol="tcp", port="http"), "http", "1..65535"),
    (rule(protocol="icmp", port=22), "22", "tcp or udp"),
    (rule(protocol="any", port=22), "22", "tcp or udp"),
    (rule(cidr="10.0.0.1/8"), "10.0.0.1/8", "IPv4 network"),
    (rule(cidr="fd00::/8"), "fd00::/8", "only IPv4"),
    (rule(cidr="10.0.0.0/8", group="db"), "10.0.0.0/8", "not both"),
    (rule(group="a;b"), "a;b", "letters, digits"),
    (rule(direction="sideways"), "sideways", "ingress"),
])
def test_a_bad_rule_is_refused_naming_the_value_and_what_is_allowed(given, named, allowed):
    with pytest.raises(InvalidInput) as error:
        normalize_rules("web", [rule(protocol="tcp", port=22), given])
    assert named in error.value.msg and allowed in error.value.msg and "rule 2" in error.value.msg


def test_too_many_rules_are_refused():
    with pytest.raises(InvalidInput, match="101 rules; at most 100"):
        normalize_rules("web", [rule(protocol="tcp", port=port) for port in range(1, 102)])


def test_a_rule_may_name_only_an_existing_group_or_its_own():
    rules = normalize_rules("web", [rule(group="web"), rule(group="db")])
    check_references("web", rules, {"db": {}})
    with pytest.raises(InvalidInput, match="'db', which does not exist; existing groups: none"):
        check_references("web", rules, {})


def test_users_of_a_group_are_its_members_and_the_groups_that_name_it():
    groups = {"web": {"rules": []}, "db": {"rules": [{"group": "web"}]}, "ops": {"rules": [{"group": "ops"}]}}
    instances = {"a": {"security_groups": ["web"]}, "b": {"security_groups": []}, "c": {"security_groups": ["ops"]}}
    assert users_of("web", groups, instances) == (["a"], ["db"])
    assert users_of("ops", groups, instances) == (["c"], [])  # naming itself is no use by another group


# the guest filter ---------------------------------------------------------------------------------------

WEB = {"rules": normalize_rules("web", [rule(protocol="tcp", port=80), rule(protocol="icmp"),
                                        rule(protocol="tcp", port="5000-5010", group="web")])}
LOCKED = {"rules": normalize_rules("locked", [rule(direction="egress", protocol="udp", port=53, cidr="192.0.2.53/32")])}


def record(host, ip, groups=(), network="net1", bridge="br-00abc"):
    return {"host": host, "interfaces": [{"network": network, "mac": "52:54:00:00:00:01", "ip": ip}],
            "bridges": {network: bridge}, "security_groups": list(groups)}


INSTANCES = {
    "web1": record("hv1", "10.0.0.5", ["web"]),
    "plain": record("hv1", "10.0.0.6"),
    "shut": record("hv1", "10.0.0.7", ["web", "locked"]),
    "web2": record("hv2", "10.0.0.9", ["web"]),
}
GROUPS = {"web": WEB, "locked": LOCKED}
CIDRS = {"net1": "10.0.0.0/24"}


def made_from(host="hv1", instances=None):
    instances = INSTANCES if instances is None else instances
    return guest_filter.inputs(guest_filter.guests_on(instances, host), instances, GROUPS)


def test_only_this_hosts_guests_get_chains_and_remote_groups_list_members_on_every_host():
    text, count = guest_filter.script(made_from(), CIDRS)
    assert 'oifname "br-00abc" ip daddr 10.0.0.5 jump in-web1-0' in text
    assert 'oifname "br-00abc" ip daddr 10.0.0.6 jump in-plain-0' in text
    assert "10.0.0.9 jump" not in text  # web2 runs on hv2
    assert "set grp-web { type ipv4_addr; elements = { 10.0.0.5, 10.0.0.7, 10.0.0.9 }; }" in text
    assert count == text.count("  chain ") + text.count("  set ")


def test_ingress_defaults_to_replies_and_the_own_network_and_egress_is_open_without_egress_rules():
    text, _count = guest_filter.script(made_from(), CIDRS)
    plain = text.split("chain in-plain-0 {")[1].split("}")[0].split()
    assert " ".join(plain) == "ip saddr 10.0.0.0/24 return drop"
    assert "ct state established,related accept" in text.split("chain forward {")[1].split("}")[0]
    web1 = text.split("chain in-web1-0 {")[1].split("}")[0]
    assert "tcp dport 80 return" in web1 and "meta l4proto icmp return" in web1
    assert "ip saddr @grp-web tcp dport 5000-5010 return" in web1
    assert "out-web1-0" not in text and "out-plain-0" not in text


def test_egress_rules_close_egress_to_the_own_network_and_what_they_allow():
    text, _count = guest_filter.script(made_from(), CIDRS)
    out = text.split("chain out-shut-0 {")[1].split("}")[0].split("\n")
    assert [line.strip() for line in out if line.strip()] == [
        "ip daddr 10.0.0.0/24 return", "ip daddr 192.0.2.53/32 udp dport 53 return", "drop"]
    forward = text.split("chain forward {")[1].split("}")[0]
    # The sender's egress is checked before any receiver's ingress, so both apply between two local guests.
    assert forward.index("jump out-shut-0") < forward.index("jump in-web1-0")


def test_the_digest_changes_with_rules_members_and_guests_and_only_with_them():
    before = guest_filter.digest(made_from())
    assert guest_filter.digest(made_from()) == before
    moved = dict(INSTANCES, web2=record("hv2", "10.0.0.10", ["web"]))  # a member elsewhere changed address
    assert guest_filter.digest(made_from(instances=moved)) != before
    elsewhere = dict(INSTANCES, other=record("hv2", "10.0.0.11"))  # not in a group, not here: no matter
    assert guest_filter.digest(made_from(instances=elsewhere)) == before
    opened = guest_filter.inputs(guest_filter.guests_on(INSTANCES, "hv1"), INSTANCES,
                                 dict(GROUPS, web={"rules": WEB["rules"][:1]}))
    assert guest_filter.digest(opened) != before


def test_the_table_comment_is_read_back_from_the_table_user_data():
    text, count = guest_filter.script(made_from(), CIDRS)
    comment = "smallcloud %s objects %d" % (guest_filter.digest(made_from()), count)
    assert 'comment "%s"' % comment in text
    tlv = bytes([0, len(comment) + 1]) + comment.encode() + b"\0"
    assert netlink.table_comment({netlink.NFTA_TABLE_USERDATA: tlv}) == comment
    assert netlink.table_comment({}) == ""


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed")
def test_nft_accepts_the_script():
    text, _count = guest_filter.script(made_from(), CIDRS)
    checked = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr + text


def test_without_bridge_netfilter_writing_the_table_is_refused(tmp_path):
    from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError

    with pytest.raises(HostError, match="br_netfilter"):
        guest_filter.apply("table inet smallcloud_guests {}", proc_root=str(tmp_path))
