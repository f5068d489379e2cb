"""Pure logic of the network runner: names, validation, dnsmasq and nftables rendering."""

import ipaddress
import os
import tempfile

import pytest
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import addressing, devices, networks
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import leases as network_leases
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.allocators import VNI_MAX
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

pytestmark = pytest.mark.unit


def params(**override):
    base = {name: spec.get("default") for name, spec in networks.MODULE_SPEC["argument_spec"].items()}
    base.update(name="web", cidr="10.0.0.0/24", underlay_interface="eth1")
    base.update(override)
    return base


@pytest.mark.parametrize("vni", [1, 0xABC, VNI_MAX])
def test_device_names_fit_ifnamsiz_and_are_distinct(vni):
    names = devices.device_names(vni)
    links = [names[key] for key in ("vxlan", "bridge", "lan_host", "wan_host")]
    assert all(len(name) <= 15 for name in links)
    assert len(set(links)) == 4
    assert names["bridge"] == "br-%x" % vni and names["namespace"] == "scnet-%x" % vni


def test_device_names_differ_between_vnis():
    seen = set()
    for vni in range(1, 2000):
        seen.update(devices.device_names(vni).values())
    assert len(seen) == 5 * 1999


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"cidr": "10.0.0.0/33"}, "10.0.0.0/33"),
        ({"cidr": "10.0.0.1/24"}, "10.0.0.1/24"),
        ({"cidr": "fd00::/64"}, "not IPv4"),
        ({"cidr": "10.0.0.0/30"}, "at most /29"),
        ({"cidr": "banana"}, "banana"),
        ({"vni": 0}, "1..16777215"),
        ({"vni": 16777216}, "16777216"),
        ({"name": "a/b"}, "a/b"),
        ({"name": "-x"}, "-x"),
        ({"name": "x" * 64}, "x" * 64),
        ({"dns_servers": ["8.8.8"]}, "8.8.8"),
        ({"mesh_peers": ["10.0.0.300"]}, "10.0.0.300"),
        ({"mtu": 100}, "576..9000"),
        ({"egress_pool": "192.0.2.0/31"}, "at most /30"),
        ({"egress_address": "192.0.2.5"}, "needs egress_pool"),
        ({"egress_pool": "192.0.2.0/24", "egress_address": "192.0.2.1"}, "192.0.2.1"),
        ({"egress_pool": "192.0.2.0/24", "egress_address": "192.0.3.9"}, "192.0.3.9"),
        ({"namespace_prefix": "a b"}, "a b"),
    ],
)
def test_validate_params_names_the_bad_value(override, fragment):
    with pytest.raises(InvalidInput) as raised:
        networks.validate_params(params(**override))
    assert fragment in raised.value.msg


def test_present_requires_cidr_through_the_argument_spec():
    # Ansible's required_if, not a hand-written check: the task fails before the runner starts. The underlay
    # defaults to the default route's device.
    spec = networks.MODULE_SPEC
    result = ArgumentSpecValidator(spec["argument_spec"], required_if=spec["required_if"]).validate({"name": "web"})
    assert result.error_messages == ["state is present but all of the following are missing: cidr"]
    assert not ArgumentSpecValidator(spec["argument_spec"], required_if=spec["required_if"]).validate(
        {"name": "web", "state": "absent"}).error_messages


def test_validate_params_accepts_good_input_and_absent_needs_little():
    parsed = networks.validate_params(params(egress_pool="192.0.2.0/24", egress_address="192.0.2.9", vni=7))
    assert parsed["network"] == ipaddress.ip_network("10.0.0.0/24")
    assert networks.validate_params(params(state="absent", cidr=None, underlay_interface=None))["network"] is None


def test_gateway_facts():
    facts = addressing.gateway_facts(ipaddress.ip_network("10.1.2.0/29"))
    assert facts == {"gateway_ip": "10.1.2.1", "gateway_cidr": "10.1.2.1/29", "dhcp_range": "10.1.2.2-10.1.2.6"}


INSTANCES = {
    "vm1": {"name": "vm1", "interfaces": [{"network": "web", "mac": "02:73:63:00:00:0A", "ip": "10.0.0.10"},
                                          {"network": "db", "mac": "02:73:63:00:00:0b", "ip": "10.9.0.3"}]},
    "odd_name": {"name": "odd_name", "interfaces": [{"network": "web", "mac": "02:73:63:00:00:0c", "ip": "10.0.0.9"}]},
    "other": {"name": "other", "interfaces": []},
    "named": {"name": "named", "hostname": "www.example.org",
              "interfaces": [{"network": "web", "mac": "02:73:63:00:00:0d", "ip": "10.0.0.11"}]},
}


def test_leases_and_attached_instances():
    leases = network_leases.leases_for("web", INSTANCES)
    # The guest's own hostname (first label) names it; an instance name that is no DNS label names nothing.
    assert sorted(leases) == [("02:73:63:00:00:0A", "10.0.0.10", "vm1"), ("02:73:63:00:00:0c", "10.0.0.9", None),
                              ("02:73:63:00:00:0d", "10.0.0.11", "www")]
    assert network_leases.attached_instances("web", INSTANCES) == ["named", "odd_name", "vm1"]
    assert network_leases.attached_instances("none", INSTANCES) == []
    # Sorted numerically by address, lower-case MACs, hostnames only when valid.
    files = network_leases.gateway_files("web", INSTANCES)
    assert files["hosts"] == ("02:73:63:00:00:0c,10.0.0.9\n02:73:63:00:00:0a,10.0.0.10,vm1\n"
                              "02:73:63:00:00:0d,10.0.0.11,www\n")
    assert files["names"] == "10.0.0.10 vm1\n10.0.0.11 www\n"


def test_dnsmasq_conf_with_dns_servers_is_dhcp_only_with_static_leases_and_mtu(tmp_path):
    conf = svc.dnsmasq_conf(str(tmp_path), "lan", ipaddress.ip_network("10.0.0.0/24"), gateway_ip="10.0.0.1",
                            mtu=1450, dns_servers=["192.0.2.53", "192.0.2.54"], dns=True)
    lines = conf.splitlines()
    assert "port=0" in lines and "interface=lan" in lines
    assert "dhcp-range=10.0.0.0,static,255.255.255.0,12h" in lines
    assert "dhcp-option-force=option:mtu,1450" in lines
    assert "dhcp-option=option:dns-server,192.0.2.53,192.0.2.54" in lines
    assert "pid-file=%s/dnsmasq.pid" % tmp_path in lines
    no_dns = svc.dnsmasq_conf(str(tmp_path), "lan", ipaddress.ip_network("10.0.0.0/24"), gateway_ip="10.0.0.1",
                              mtu=1400, dns_servers=[])
    assert "dns-server" not in no_dns and "port=0" in no_dns.splitlines()


def test_dnsmasq_conf_gateway_dns_answers_instance_names_and_forwards(tmp_path):
    conf = svc.dnsmasq_conf(str(tmp_path), "lan", ipaddress.ip_network("10.0.0.0/24"), gateway_ip="10.0.0.1",
                            mtu=1450, dns_servers=[], dns=True).splitlines()
    assert "port=0" not in conf and "no-resolv" not in conf  # answers on 53, forwards per resolv.conf
    assert "addn-hosts=%s/names" % tmp_path in conf
    assert "dhcp-option=option:dns-server,10.0.0.1" in conf
    assert "no-hosts" in conf and "domain-needed" in conf


def test_nft_script_keeps_floating_chains_and_comments_every_rule():
    script = svc.nft_base_script("lan", "wan", "10.0.0.0/24", "192.0.2.7")
    assert "flush chain ip smallcloud floating" not in script  # floating rules survive a rewrite
    rules = [line for line in script.splitlines() if line.startswith("add rule")]
    assert rules and all('comment "' in line for line in rules)
    assert 'add rule ip smallcloud postrouting oifname "wan" ip saddr 10.0.0.0/24 snat to 192.0.2.7' \
        ' comment "egress 10.0.0.0/24 via 192.0.2.7"' in script
    assert [comment for _c, _r, comment in svc.nft_base_rules("lan", "wan", "10.0.0.0/24", "192.0.2.7")] == [
        "floating dnat", "floating snat", "egress 10.0.0.0/24 via 192.0.2.7", "replies in", "floating in",
        "isolate 10.0.0.0/24"]


def test_top_records_skips_nested_keys():
    assert records.top_records({"a": 1, "a/b": 2, "c": 3}) == {"a": 1, "c": 3}


def test_a_bare_namespace_file_is_no_namespace(tmp_path, monkeypatch):
    """What an ``ip netns add`` killed before its bind mount leaves: a file that cannot be opened as a namespace,
    so the network's next converge creates the namespace again instead of failing on it."""
    monkeypatch.setattr(svc, "NETNS_DIR", str(tmp_path))
    (tmp_path / "scnet-a1").touch()
    assert not svc.netns_exists("scnet-a1")
    assert not svc.netns_exists("scnet-b2")


def test_in_netns_wraps_only_named_namespaces():
    assert svc.in_netns(None, ["nft", "list"]) == ["nft", "list"]
    assert svc.in_netns("x", ["nft"]) == ["ip", "netns", "exec", "x", "nft"]


def test_dnsmasq_runs_unprivileged_and_refuses_a_state_dir_it_could_not_enter(tmp_path):
    conf = svc.dnsmasq_conf(str(tmp_path / "gw"), "lan", ipaddress.ip_network("10.0.0.0/24"), gateway_ip="10.0.0.1",
                            mtu=1450, dns_servers=[])
    assert "user=dnsmasq\ngroup=nogroup\n" in conf and "user=root" not in conf
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(InvalidInput) as caught:
        svc.check_reachable_by_dnsmasq(str(private / "networks" / "scnet-a"))
    assert str(private) in caught.value.msg and "mode 700" in caught.value.msg
    reachable = tempfile.mkdtemp(prefix="sct-reach-", dir="/var/tmp")
    try:
        os.chmod(reachable, 0o755)
        svc.check_reachable_by_dnsmasq(os.path.join(reachable, "networks", "scnet-a"))  # no error
    finally:
        os.rmdir(reachable)
