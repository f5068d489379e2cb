"""The state store against a real etcd: records, allocators under contention, locks, events, failover."""

import ipaddress
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
from harness.paths import ROOT
from harness.etcd import EtcdCluster, b64, etcd_request

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import (
    Conflict,
    InvalidInput,
    LockTimeout,
    PoolExhausted,
    StoreUnreachable,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import EtcdGateway
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

pytestmark = pytest.mark.integration

WORKERS = 8
PER_WORKER = 50


@pytest.fixture
def store(etcd):
    """A Store on the test's private prefix."""
    return Store.from_params(etcd.module_args)


# records -----------------------------------------------------------------------------------------


def test_records_round_trip_as_json(store, etcd):
    store.put("networks/web", {"cidr": "10.0.0.0/24", "vni": 7})
    assert store.get("networks/web") == {"cidr": "10.0.0.0/24", "vni": 7}
    assert store.get("networks/absent") is None
    raw = etcd_request(etcd.endpoints[0], "kv/range", {"key": b64(etcd.prefix + "/networks/web")})
    assert raw["kvs"][0]["value"] == b64('{"cidr":"10.0.0.0/24","vni":7}')


def test_create_and_compare_and_swap(store):
    assert store.create("instances/a", {"state": "new"})
    assert not store.create("instances/a", {"state": "other"})
    value, revision = store.get_with_revision("instances/a")
    assert value == {"state": "new"} and revision > 0
    assert store.compare_and_swap("instances/a", revision, {"state": "running"})
    assert not store.compare_and_swap("instances/a", revision, {"state": "stale writer"})
    assert store.get("instances/a") == {"state": "running"}
    assert store.get_with_revision("instances/none") == (None, 0)


def test_delete_list_and_delete_prefix(store, etcd):
    for name in ("a", "b", "c"):
        store.put("hosts/" + name, {"name": name})
    store.put("hosts-other/x", 1)  # a sibling folder sharing the name's prefix is not listed
    store.put("hosts/a/nested", [1, 2])
    assert store.list("hosts") == {"a": {"name": "a"}, "b": {"name": "b"}, "c": {"name": "c"}, "a/nested": [1, 2]}
    assert store.keys("hosts/") == ["a", "a/nested", "b", "c"]
    _value, revision = store.get_with_revision("hosts/b")
    assert not store.delete("hosts/b", mod_revision=revision + 100)
    assert store.delete("hosts/b", mod_revision=revision)
    assert store.delete("hosts/c") and not store.delete("hosts/c")
    assert store.delete_prefix("hosts") == 2
    assert store.list("hosts") == {}
    assert store.delete_prefix("hosts-other") == 1
    with pytest.raises(InvalidInput, match="whole store"):
        store.delete_prefix("/")
    assert etcd.key_count() == 0


# allocators ----------------------------------------------------------------------------------------


def test_vni_requested_conflict_names_the_owner_and_release_is_idempotent(store, etcd):
    vni = store.allocate_vni("network/a")
    assert 1 <= vni <= 16777215
    assert store.get("vni/%d" % vni)["owner"] == "network/a"
    assert store.allocate_vni("network/b", requested=4242) == 4242
    assert store.allocate_vni("network/b", requested="4242") == 4242  # same owner: returned again
    with pytest.raises(Conflict) as caught:
        store.allocate_vni("network/c", requested=4242)
    assert "4242" in caught.value.msg and "network/b" in caught.value.msg
    with pytest.raises(Conflict, match="belongs to network/b"):
        store.release_vni(4242, owner="network/c")
    assert store.release_vni(4242, owner="network/b")
    assert not store.release_vni(4242)
    assert store.release_vni(vni) and not store.release_vni(vni)
    assert etcd.key_count() == 0


def test_ip_pool_never_hands_out_network_gateway_or_broadcast(store):
    cidr = "10.20.0.0/28"
    got = [store.allocate_ip("net1", cidr, "port-%d" % index) for index in range(13)]
    hosts = [str(address) for address in ipaddress.IPv4Network(cidr).hosts()]
    assert sorted(got, key=ipaddress.IPv4Address) == hosts[1:]  # all but the gateway .1
    with pytest.raises(PoolExhausted) as caught:
        store.allocate_ip("net1", cidr, "one-too-many")
    assert "net1 (10.20.0.0/28) is exhausted" in caught.value.msg
    assert caught.value.details["pool"] == "net1 (10.20.0.0/28)"
    assert store.release_ip("net1", got[3])
    assert store.allocate_ip("net1", cidr, "again") == got[3]  # the only free one


def test_kept_taken_set_sees_what_other_controllers_did(store, etcd):
    other = Store.from_params(etcd.module_args)  # a second controller
    cidr = "10.30.0.0/29"  # 5 assignable addresses
    mine = [store.allocate_ip("net1", cidr, "a%d" % index) for index in range(3)]
    theirs = [other.allocate_ip("net1", cidr, "b%d" % index) for index in range(2)]
    assert len(set(mine + theirs)) == 5
    with pytest.raises(PoolExhausted):
        store.allocate_ip("net1", cidr, "a3")
    assert other.release_ip("net1", theirs[0])
    assert store.allocate_ip("net1", cidr, "a4") == theirs[0]  # released elsewhere, found on a re-read


def test_ip_requested(store):
    assert store.allocate_ip("net1", "10.0.0.0/24", "vm1", requested="10.0.0.10") == "10.0.0.10"
    assert store.allocate_ip("net1", "10.0.0.0/24", "vm1", requested="10.0.0.10") == "10.0.0.10"
    with pytest.raises(Conflict, match="10.0.0.10 of net1 .* is taken by vm1"):
        store.allocate_ip("net1", "10.0.0.0/24", "vm2", requested="10.0.0.10")
    with pytest.raises(InvalidInput, match="gateway 10.0.0.1"):
        store.allocate_ip("net1", "10.0.0.0/24", "vm2", requested="10.0.0.1")
    assert store.allocate_ip("net2", "10.0.0.0/24", "vm2", requested="10.0.0.10") == "10.0.0.10"  # other network
    assert store.release_ip("net1", "10.0.0.10") and not store.release_ip("net1", "10.0.0.10")


def test_mac_and_floating(store):
    mac = store.allocate_mac("vm1/nic0")
    assert mac.startswith("02:73:63:") and store.get("mac/" + mac)["owner"] == "vm1/nic0"
    assert store.allocate_mac("vm2/nic0", requested="52-54-00-AA-BB-CC") == "52:54:00:aa:bb:cc"
    with pytest.raises(Conflict, match="vm2/nic0"):
        store.allocate_mac("vm3/nic0", requested="52:54:00:aa:bb:cc")
    assert store.release_mac(mac) and not store.release_mac(mac)
    floating = store.allocate_floating("198.51.100.0/30", "vm1")
    assert floating == "198.51.100.2"
    assert store.get("floating/198.51.100.0_30/198.51.100.2")["owner"] == "vm1"
    with pytest.raises(PoolExhausted, match="floating 198.51.100.0/30 is exhausted"):
        store.allocate_floating("198.51.100.0/30", "vm2")
    assert store.release_floating("198.51.100.0/30", floating)
    assert not store.release_floating("198.51.100.0/30", floating)


class LostAnswerGateway(EtcdGateway):
    """Sends every transaction twice, as failover does when a member committed it but its answer was lost."""

    def call(self, path, payload):
        if path == "kv/txn":
            super().call(path, payload)
        return super().call(path, payload)


def test_a_repeated_claim_is_recognised_as_our_own(etcd):
    gateway = LostAnswerGateway(etcd.endpoints)
    store = Store(gateway, prefix=etcd.prefix)
    vni = store.allocate_vni("network/a")
    address = store.allocate_ip("net1", "10.0.0.0/24", "port-a")
    assert store.list("vni") == {str(vni): store.get("vni/%d" % vni)}  # one allocation, not a leaked first one
    assert store.keys("ipam/net1") == [address]


def _allocate_many(endpoints, prefix, kind, worker, count, cidr):
    """One worker process: ``count`` allocations; returns (values, error messages)."""
    store = Store.from_params({"etcd_endpoints": endpoints, "etcd_prefix": prefix})
    values, errors = [], []
    for index in range(count):
        owner = "w%d-%d" % (worker, index)
        try:
            if kind == "ip":
                values.append((owner, store.allocate_ip("big", cidr, owner)))
            elif kind == "vni":
                values.append((owner, store.allocate_vni(owner)))
            else:
                values.append((owner, store.allocate_mac(owner)))
        except PoolExhausted as error:
            errors.append(error.msg)
    return values, errors


def _run_workers(etcd, kind, cidr=None):
    """WORKERS processes x PER_WORKER allocations in parallel; all values and errors."""
    jobs = [(etcd.endpoints, etcd.prefix, kind, worker, PER_WORKER, cidr) for worker in range(WORKERS)]
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        results = pool.starmap(_allocate_many, jobs)
    values = [pair for worker_values, _errors in results for pair in worker_values]
    errors = [message for _values, worker_errors in results for message in worker_errors]
    return values, errors


@pytest.mark.parametrize(("kind", "folder", "cidr"), [("ip", "ipam/big", "10.64.0.0/23"), ("vni", "vni", None)])
def test_parallel_allocations_are_distinct_and_all_recorded(store, etcd, kind, folder, cidr):
    # A /23 has 509 assignable addresses: 400 of them taken concurrently forces many collisions.
    values, errors = _run_workers(etcd, kind, cidr)
    assert errors == []
    assert len(values) == WORKERS * PER_WORKER
    assert len({value for _owner, value in values}) == WORKERS * PER_WORKER
    recorded = {key: record["owner"] for key, record in store.list(folder).items()}
    assert recorded == {str(value): owner for owner, value in values}


def test_parallel_demand_larger_than_the_pool(store, etcd):
    cidr = "10.65.0.0/26"  # 61 assignable addresses for 400 requests
    values, errors = _run_workers(etcd, "ip", cidr)
    assert len(values) == 61 == len({address for _owner, address in values})
    assert len(errors) == WORKERS * PER_WORKER - 61
    assert all(
        message == "pool big (10.65.0.0/26) is exhausted: all 61 assignable addresses are taken" for message in errors
    )
    assert len(store.keys("ipam/big")) == 61


# events ------------------------------------------------------------------------------------------------


def test_event_log_is_ordered_and_bounded(etcd):
    store = Store.from_params(etcd.module_args, events_max=5)
    for index in range(12):
        store.log_event("instance", "vm1", "step %d" % index)
    store.log_event("instance", "vm2", "other object")
    events = store.events("instance", "vm1")
    assert [event["message"] for event in events] == ["step %d" % index for index in range(7, 12)]
    assert all(event["time"].endswith("Z") for event in events)
    assert len(store.keys("events/instance/vm1")) <= 5 + 5 // 4 + 1
    assert store.events("instance", "never") == []


# locks -------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, {collections!r})
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import EtcdGateway
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store
store = Store.from_params({{"etcd_endpoints": {endpoints!r}, "etcd_prefix": {prefix!r}}})
lock = store.lock("network/web", ttl=2, timeout=10).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_excludes_and_is_released_on_exit(store, etcd):
    with store.lock("network/web", ttl=5, timeout=5) as held:
        assert held.held and store.get("locks/network/web")["holder"].endswith(":%d" % os.getpid())
        with pytest.raises(LockTimeout) as caught:
            store.lock("network/web", ttl=5, timeout=0.2).acquire()
        assert "network/web" in caught.value.msg and caught.value.details["holder"].endswith(":%d" % os.getpid())
    assert not held.held
    assert etcd.key_count() == 0  # the lock key went with its lease
    with store.lock("network/web", ttl=5, timeout=0):
        pass


def test_lock_of_a_killed_holder_frees_itself_after_its_ttl(store, etcd):
    script = HOLDER.format(
        collections=str(ROOT / ".cache" / "collections"), endpoints=etcd.endpoints, prefix=etcd.prefix
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # Renewed in the background: still held after more than its TTL.
        with pytest.raises(LockTimeout, match="held by .*:%d" % holder.pid):
            store.lock("network/web", ttl=2, timeout=3).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with store.lock("network/web", ttl=2, timeout=20) as taken:
            assert taken.held
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert etcd.key_count() == 0


# endpoints ----------------------------------------------------------------------------------------------


@pytest.fixture
def cluster3(tmp_path):
    """A 3-member loopback cluster (local: the shared etcd_cluster fixture does not create its workdir yet)."""
    cluster = EtcdCluster(tmp_path, size=3)
    yield cluster
    cluster.stop()


def test_three_member_cluster_keeps_allocating_with_one_member_stopped(cluster3):
    # The leader first: stopping it is the hard case (the others must elect a new one).
    members = sorted(cluster3.members, key=lambda member: not _is_leader(member.client_url))
    endpoints = [member.client_url for member in members]
    store = Store.from_params({"etcd_endpoints": endpoints, "etcd_prefix": "/failover/v1"})
    before = [store.allocate_ip("net", "10.1.0.0/24", "a%d" % index) for index in range(5)]
    members[0].stop()  # the endpoint the store was using
    after = [store.allocate_ip("net", "10.1.0.0/24", "b%d" % index) for index in range(5)]
    assert store.gateway.endpoint.url != endpoints[0]
    assert len(set(before + after)) == 10
    survivor = Store.from_params({"etcd_endpoints": endpoints[2:], "etcd_prefix": "/failover/v1"})
    assert sorted(survivor.keys("ipam/net")) == sorted(before + after)
    assert store.delete_prefix("ipam") == 10
    for member in members[1:]:
        member.stop()
    with pytest.raises(StoreUnreachable) as caught:
        store.get("networks/x")
    assert caught.value.details["endpoints"] == endpoints[1:] + endpoints[:1]


def _is_leader(endpoint):
    """True when the member at ``endpoint`` is the cluster's leader."""
    status = Store.from_params({"etcd_endpoints": [endpoint]}).status()
    return status["leader"] == status["member_id"]
