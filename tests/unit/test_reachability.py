"""``wait_for: ssh``: where a guest is probed from, the refusal before any change, and the wait itself."""

import socket
import threading

import pytest
from harness.memory_store import MemoryStore

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import reachability
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records

pytestmark = pytest.mark.unit

RECORDS = {
    "networks/web": {"name": "web", "cidr": "10.0.0.0/24", "vni": 0xA1},
    "networks/far": {"name": "far", "cidr": "10.9.0.0/24", "vni": 0xB2},
    "floating_ips/203.0.113.5": {"address": "203.0.113.5", "network": "far", "instance": "exposed",
                                 "fixed_ip": "10.9.0.7"},
    # mapped by fixed address only (no instance named): the guest at 10.9.0.8 on far
    "floating_ips/203.0.113.6": {"address": "203.0.113.6", "network": "far", "instance": None,
                                 "fixed_ip": "10.9.0.8"},
}
LOCAL_NAMESPACES = {"scnet-a1"}  # web's gateway runs here, far's elsewhere


@pytest.fixture
def listings(monkeypatch):
    """The networks and floating IPs listings, as the instance runner reads them once per batch."""
    monkeypatch.setattr(reachability.svc, "netns_exists", lambda name: name in LOCAL_NAMESPACES)
    store = MemoryStore(RECORDS)
    return records.networks(store), records.floating_ips(store)


def record(network, ip):
    return {"interfaces": [{"network": network, "ip": ip, "mac": "02:73:63:00:00:01"}]}


def test_a_guest_of_a_local_gateway_is_probed_from_its_namespace(listings):
    assert reachability.probe_route("w", record("web", "10.0.0.5"), *listings, "scnet-") == (
        "10.0.0.5", "scnet-a1", "10.0.0.5 from namespace scnet-a1")


def test_a_guest_of_a_remote_gateway_is_probed_on_its_floating_ip(listings):
    assert reachability.probe_route("exposed", record("far", "10.9.0.7"), *listings, "scnet-") == (
        "203.0.113.5", None, "floating IP 203.0.113.5")
    assert reachability.probe_route("by-address", record("far", "10.9.0.8"), *listings, "scnet-") == (
        "203.0.113.6", None, "floating IP 203.0.113.6")


def test_a_guest_with_neither_is_refused_before_any_change_naming_it_and_its_network(listings):
    reachability.check_reachable("w", ["web"], *listings, "scnet-")
    reachability.check_reachable("exposed", ["far"], *listings, "scnet-")
    with pytest.raises(InvalidInput) as caught:
        reachability.check_reachable("hidden", ["far"], *listings, "scnet-")
    assert "instance hidden cannot be reached from this host" in caught.value.msg
    assert "network far has its gateway on another host" in caught.value.msg
    with pytest.raises(InvalidInput, match="it has no network"):
        reachability.check_reachable("alone", [], *listings, "scnet-")
    with pytest.raises(InvalidInput, match="instance lost cannot be reached"):  # no floating IP maps 10.9.0.99
        reachability.probe_route("lost", record("far", "10.9.0.99"), *listings, "scnet-")


def test_wait_returns_the_seconds_each_guest_took_and_names_the_silent_ones(monkeypatch):
    now = [0.0]
    answers = {"10.0.0.5": 3, "10.0.0.6": 10 ** 6}  # answers from the 3rd probe on; never
    probes = []

    def banner(address, netns=None):
        probes.append((address, netns))
        return sum(1 for seen, _ns in probes if seen == address) >= answers[address]

    monkeypatch.setattr(reachability, "ssh_banner", banner)

    def sleep(seconds):
        now[0] += seconds

    routes = {"a": ("10.0.0.5", "scnet-a1", "10.0.0.5 from namespace scnet-a1")}
    assert reachability.wait_for_ssh(routes, 60, clock=lambda: now[0], sleep=sleep) == {"a": 4.0}
    routes["b"] = ("10.0.0.6", None, "floating IP 10.0.0.6")
    with pytest.raises(HostError) as caught:
        reachability.wait_for_ssh(routes, 10, clock=lambda: now[0], sleep=sleep)
    assert "no SSH banner within 10 s from b (floating IP 10.0.0.6)" in caught.value.msg


def test_ssh_banner_needs_the_ssh_greeting():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    port = server.getsockname()[1]
    greetings = [b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.0 400 Bad Request\r\n"]

    def serve():
        for greeting in greetings:
            connection, _peer = server.accept()
            connection.sendall(greeting)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert reachability.ssh_banner("127.0.0.1", port=port, timeout=5) is True
        assert reachability.ssh_banner("127.0.0.1", port=port, timeout=5) is False
    finally:
        thread.join(10)
        server.close()
    assert reachability.ssh_banner("127.0.0.1", port=port, timeout=1) is False  # nobody listens
