"""The fence's nft script and its control set (network/fence.py): pure, no nft run here (test_network and the
multi-host e2e test run it for real)."""

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.network import fence
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import parse_endpoints

pytestmark = pytest.mark.unit


def test_the_control_set_is_the_hosts_underlays_and_the_etcd_members_by_address():
    hosts = {"h1": {"underlay_address": "10.0.0.11"}, "h2": {"underlay_address": "10.0.0.2"}, "h3": {},
             "junk": "not a record"}
    endpoints = parse_endpoints(["https://10.0.0.2:2379", "https://etcd.example.org:2379", "http://127.0.0.1:2379"],
                                tls=True)
    # Sorted as addresses; a member named by host name and loopback cannot be matched and are left out.
    assert fence.control_addresses(hosts, endpoints) == ["10.0.0.2", "10.0.0.11"]


def test_the_script_replaces_the_table_in_one_transaction_and_only_new_guest_traffic_is_dropped():
    text = fence.script(["10.0.0.2", "10.0.0.11"])
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == ["table inet smallcloud_fence", "delete table inet smallcloud_fence",
                         "table inet smallcloud_fence {"]
    assert "set control { type ipv4_addr; elements = { 10.0.0.2, 10.0.0.11 } }" in lines
    # In each chain the replies to the host's own connections come first, then the drops.
    input_chain = lines[lines.index("chain input {"):lines.index("chain forward {")]
    forward_chain = lines[lines.index("chain forward {"):]
    assert [line for line in input_chain if line.startswith("iifname")] == [
        'iifname "ve-*" ct state established,related accept', 'iifname "ve-*" drop', 'iifname "br-*" drop']
    assert [line for line in forward_chain if line.startswith("iifname")] == [
        'iifname "ve-*" ct state established,related accept', 'iifname "ve-*" ip daddr @control drop']
    assert fence.wanted(["10.0.0.2"]) == {"control": ["10.0.0.2"], "input": 3, "forward": 2}


def test_an_empty_control_set_is_still_a_valid_set():
    assert "set control { type ipv4_addr;  }" in fence.script([])
