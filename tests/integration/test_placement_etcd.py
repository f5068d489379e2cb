"""Placement against a real etcd: the ``placement`` runner (host/placing.py) and ``Placements`` (host/placement.py).

Nothing below etcd is faked: host records, ledgers and placements are real keys under the test's private
prefix (removed afterwards by the ``etcd`` fixture). The runner is called in-process with a module stub; the
contention test runs real worker processes, each with its own Store. The instance module's absent path runs
on a real libvirtd, driven through Ansible.
"""

import collections
import multiprocessing
import os
import tempfile
import time

import pytest
from harness.module_stub import ModuleStub

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput, SmallcloudError
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import placing
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (
    NoCapacity,
    Placements,
    demand_of,
    free_capacity,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

pytestmark = pytest.mark.integration

CAPACITY = {"vcpus": 4, "memory_mb": 8192, "disk_gb": 100}


@pytest.fixture
def store(etcd):
    """A Store on the test's private prefix."""
    return Store.from_params(etcd.module_args)


def add_host(store, name, state="active", ratios=None, **capacity):
    """``hosts/NAME`` as the host module writes it; its host name is ``NAME.example.org``."""
    store.put("hosts/%s" % name, {"name": name, "hostname": "%s.example.org" % name, "state": state,
                                  "capacity": dict(CAPACITY, **capacity), "allocation_ratios": ratios or {}})


def place(etcd, instances, check_mode=False, **options):
    """One run of the placement runner on the test's prefix."""
    module = ModuleStub(placing.MODULE_SPEC, check_mode=check_mode, instances=instances,
                        **dict(etcd.module_args, **options))
    return placing.run(module)


def hosts_of(result):
    return {name: item["host"] for name, item in result["placements"].items()}


def ledger_names(store):
    """``{host: sorted instance names}`` of every ledger."""
    return {host: sorted(ledger["instances"]) for host, ledger in store.list("placement/hosts").items()}


# the runner ----------------------------------------------------------------------------------------


def test_a_batch_is_spread_over_the_hosts_and_a_rerun_changes_nothing(store, etcd):
    for name in ("hv-a", "hv-b", "hv-c"):
        add_host(store, name)
    batch = [{"name": "web%d" % index, "memory": 2048, "disk_size": "10G"} for index in range(6)]
    result = place(etcd, batch)
    assert result["changed"] is True and len(result["actions"]) == 6
    placed = hosts_of(result)
    assert sorted(collections.Counter(placed.values()).values()) == [2, 2, 2]
    assert all(item["new"] for item in result["placements"].values())
    for name, host in placed.items():
        record = store.get("placement/instances/%s" % name)
        assert record["host"] == host and record["memory_mb"] == 2048 and record["disk_gb"] == 10
        assert record["reason"] and record["time"]
    assert ledger_names(store) == {host: sorted(n for n, h in placed.items() if h == host) for host in placed.values()}

    again = place(etcd, batch)
    assert again["changed"] is False and again["actions"] == [] and hosts_of(again) == placed


def test_a_placed_instance_never_moves_even_when_its_host_shrinks(store, etcd):
    add_host(store, "hv-a", memory_mb=16384)
    add_host(store, "hv-b")
    first = place(etcd, [{"name": "web", "memory": 4096}])
    assert hosts_of(first) == {"web": "hv-a"}
    add_host(store, "hv-a", memory_mb=512, vcpus=1, disk_gb=1)  # far too small for it now
    before = store.list("")
    again = place(etcd, [{"name": "web", "memory": 4096}])
    assert again["changed"] is False and hosts_of(again) == {"web": "hv-a"}
    assert store.list("") == before


def test_check_mode_previews_the_placements_and_writes_nothing(store, etcd):
    add_host(store, "hv-a")
    add_host(store, "hv-b", memory_mb=12288)
    before = store.list("")
    batch = [{"name": "web1", "memory": 8192}, {"name": "web2", "memory": 8192}, {"name": "web3", "memory": 4096}]
    preview = place(etcd, batch, check_mode=True)
    assert preview["changed"] is True and len(preview["actions"]) == 3
    # The preview counts its own guesses: web2 does not go where web1 took the memory, web3 fits only there.
    assert hosts_of(preview) == {"web1": "hv-b", "web2": "hv-a", "web3": "hv-b"}
    assert store.list("") == before
    assert hosts_of(place(etcd, batch)) == hosts_of(preview)


def test_an_instance_running_before_placement_is_adopted_on_its_hosts_registry_name(store, etcd):
    add_host(store, "hv-a", memory_mb=1024)  # too small for it: adoption checks no capacity
    add_host(store, "hv-b", memory_mb=65536)
    store.put("instances/old", {"name": "old", "host": "hv-a.example.org", "state": "running"})
    result = place(etcd, [{"name": "old", "memory": 4096}])
    assert result["changed"] is True
    assert result["placements"]["old"] == {"host": "hv-a", "reason": "adopted where it already ran", "new": True}
    assert store.get("placement/instances/old")["host"] == "hv-a"
    assert ledger_names(store) == {"hv-a": ["old"]}


def test_an_unplaced_running_instance_pinned_elsewhere_is_refused_naming_both_hosts(store, etcd):
    add_host(store, "hv-a")
    add_host(store, "hv-b")
    store.put("instances/old", {"name": "old", "host": "hv-a.example.org", "state": "running"})
    before = store.list("")
    with pytest.raises(InvalidInput) as caught:
        place(etcd, [{"name": "old", "host": "hv-b"}])
    assert "host hv-b is not where it is (hv-a)" in caught.value.msg
    assert store.list("") == before


def test_absent_entries_are_reported_where_they_are_and_reserve_nothing(store, etcd):
    add_host(store, "hv-a")
    add_host(store, "hv-b")
    place(etcd, [{"name": "placed", "host": "hv-b"}])
    store.put("instances/unplaced", {"name": "unplaced", "host": "hv-a.example.org"})
    before = store.list("")
    result = place(etcd, [{"name": "placed", "state": "absent"}, {"name": "unplaced", "state": "absent"},
                          {"name": "nowhere", "state": "absent", "memory": 1 << 30}])
    assert result["changed"] is False and result["actions"] == []
    assert result["placements"] == {
        "placed": {"host": "hv-b", "reason": "being removed", "new": False},
        "unplaced": {"host": "hv-a", "reason": "being removed", "new": False},
        "nowhere": {"host": None, "reason": "being removed", "new": False},
    }
    assert store.list("") == before


def test_a_pinned_host_other_than_the_placement_is_refused_naming_both(store, etcd):
    add_host(store, "hv-a")
    add_host(store, "hv-b")
    place(etcd, [{"name": "web", "host": "hv-a"}])
    before = store.list("")
    with pytest.raises(InvalidInput) as raised:
        place(etcd, [{"name": "web", "host": "hv-b"}])
    assert "web" in raised.value.msg and "hv-b" in raised.value.msg and "(hv-a)" in raised.value.msg
    assert store.list("") == before
    assert place(etcd, [{"name": "web", "host": "hv-a"}])["changed"] is False


def test_a_pinned_instance_goes_to_its_host_even_when_that_host_is_full(store, etcd):
    add_host(store, "hv-a", memory_mb=1024)
    add_host(store, "hv-b", memory_mb=65536)
    result = place(etcd, [{"name": "big", "memory": 4096, "host": "hv-a"}])
    assert result["placements"]["big"] == {"host": "hv-a", "reason": "pinned by its host key", "new": True}
    free = free_capacity(store.get("hosts/hv-a"), store.get("placement/hosts/hv-a"))
    assert free["memory_mb"] == -3072  # the reservation is still counted


# bad input changes nothing -------------------------------------------------------------------------


BAD_BATCHES = {
    "unknown host": ([{"name": "web", "host": "hv-zz"}], {}, InvalidInput, ["hv-zz", "hv-a (active)"]),
    "anti_affinity beyond the hosts": (
        [{"name": "db%d" % index, "anti_affinity": "db"} for index in range(3)], {}, NoCapacity,
        ["db2", "anti_affinity group db", "hv-a, hv-b"]),
    "ratio below 1": ([{"name": "web"}], {"cpu_allocation_ratio": 0.5}, InvalidInput,
                      ["cpu_allocation_ratio", "0.5"]),
    "ratio not a number": ([{"name": "web"}], {"memory_allocation_ratio": "abc"}, InvalidInput,
                           ["memory_allocation_ratio", "'abc'"]),
    "unknown key": ([{"name": "web", "colour": "red"}], {}, InvalidInput, ["colour"]),
    "name with a slash": ([{"name": "a/b"}], {}, InvalidInput, ["'a/b'"]),
    "name with a space": ([{"name": "a b"}], {}, InvalidInput, ["'a b'"]),
    "bad group name": ([{"name": "web", "affinity": "x/y"}], {}, InvalidInput, ["'x/y'"]),
    "bad disk size": ([{"name": "web", "disk_size": "lots"}], {}, InvalidInput, ["lots"]),
    "memory below 1": ([{"name": "web", "memory": 0}], {}, InvalidInput, ["memory 0"]),
    "listed twice": ([{"name": "web"}, {"name": "web"}], {}, InvalidInput, ["web", "more than once"]),
    "the third does not fit": (
        [{"name": "fit1", "memory": 8192}, {"name": "fit2", "memory": 8192}, {"name": "big", "memory": 8192}],
        {}, NoCapacity, ["instance big cannot be placed", "8192 MiB memory", "0 MiB memory"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_input_fails_naming_the_value_and_changes_nothing(store, etcd, case):
    batch, options, error, named = BAD_BATCHES[case]
    add_host(store, "hv-a")
    add_host(store, "hv-b")
    before = store.list("")
    with pytest.raises(error) as raised:
        place(etcd, batch, **options)
    for text in named:
        assert text in raised.value.msg, (case, raised.value.msg)
    assert store.list("") == before, case


# release -------------------------------------------------------------------------------------------


def test_release_drops_the_placement_and_the_ledger_entry_and_then_the_empty_ledger(store):
    add_host(store, "hv-a")
    placements = Placements(store)
    assert placements.place("web1", demand_of(1, 1024, 0))[:2] == ("hv-a", placements.placement_of("web1")["reason"])
    assert placements.place("web2", demand_of(2, 2048, 0))[0] == "hv-a"
    assert Placements(store).place("web1", demand_of(1, 1024, 0))[2] is False  # already placed

    assert Placements(store).release("web1") == "hv-a"
    assert store.get("placement/instances/web1") is None
    assert store.get("placement/hosts/hv-a") == {"instances": {"web2": {
        "vcpus": 2, "memory_mb": 2048, "disk_gb": 0, "affinity": None, "anti_affinity": None}}}
    assert placements.release("web2") == "hv-a"
    assert store.keys("placement") == []
    assert placements.release("web2") is None
    assert Placements(store).release("never-placed") is None
    assert store.keys("") == ["hosts/hv-a"]


def test_a_released_instance_is_placed_afresh(store):
    add_host(store, "hv-a", memory_mb=2048)
    add_host(store, "hv-b", memory_mb=4096)
    placements = Placements(store)
    assert placements.place("web", demand_of(1, 2048, 0))[0] == "hv-b"
    placements.place("other", demand_of(1, 2048, 0))  # hv-b now has 0 free, hv-a 2048
    placements.release("web")
    assert placements.place("web", demand_of(1, 2048, 0))[0] == "hv-b"  # the view was re-read after release


# contention ----------------------------------------------------------------------------------------

WORKERS = 4
PER_WORKER = 15
PER_HOST = 15  # instances of DEMAND one host holds: 3 hosts hold 45 of the 60
DEMAND = demand_of(1, 1024, 2 * 2 ** 30)


def _place_many(params, worker, start):
    """One worker process: its own Store, PER_WORKER placements; ``(placed, failed)`` as plain data."""
    placements = Placements(Store.from_params(params))
    placed, failed = {}, {}
    while time.time() < start:  # every worker starts at once
        time.sleep(0.001)
    for index in range(PER_WORKER):
        name = "w%d-%02d" % (worker, index)
        try:
            placed[name] = placements.place(name, DEMAND)[0]
        except SmallcloudError as error:
            failed[name] = (type(error).__name__, error.msg)
    return placed, failed


def test_concurrent_placements_never_overbook_a_host(store, etcd):
    for name in ("hv-a", "hv-b", "hv-c"):
        # Memory binds (15 x 1024 MiB); CPUs (4 x 4 = 16) and disk (40 GiB) hold a little more.
        add_host(store, name, vcpus=4, memory_mb=PER_HOST * 1024, disk_gb=40)
    start = time.time() + 1
    jobs = [(etcd.module_args, worker, start) for worker in range(WORKERS)]
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        results = pool.starmap(_place_many, jobs)
    placed = {name: host for worker_placed, _failed in results for name, host in worker_placed.items()}
    failed = {name: error for _placed, worker_failed in results for name, error in worker_failed.items()}

    assert len(placed) + len(failed) == WORKERS * PER_WORKER
    assert len(placed) == 3 * PER_HOST
    assert {kind for kind, _msg in failed.values()} == {"NoCapacity"}, failed
    ledgers = store.list("placement/hosts")
    records = store.list("placement/instances")
    hosts = store.list("hosts")
    in_ledgers = collections.Counter(name for ledger in ledgers.values() for name in ledger["instances"])
    assert set(in_ledgers) == set(placed) == set(records) and set(in_ledgers.values()) == {1}
    for host, ledger in ledgers.items():
        free = free_capacity(hosts[host], ledger)
        assert min(free.values()) >= 0, (host, free)
        mine = [record for record in records.values() if record["host"] == host]
        assert sorted(ledger["instances"]) == sorted(name for name, record in records.items()
                                                     if record["host"] == host)
        for resource in ("vcpus", "memory_mb", "disk_gb"):
            assert sum(entry[resource] for entry in ledger["instances"].values()) == \
                sum(record[resource] for record in mine)
    assert {name: record["host"] for name, record in records.items()} == placed


# the instance module's absent path -----------------------------------------------------------------


def test_instance_absent_releases_its_placement(store, etcd, libvirtd, ansible):
    add_host(store, "hv-a")
    Placements(store).place("sct-placed", demand_of(1, 1024, 0), pinned="hv-a")
    Placements(store).place("sct-kept", demand_of(1, 1024, 0), pinned="hv-a")
    instances_dir = tempfile.mkdtemp(prefix="sct-place-", dir="/var/tmp")
    try:
        args = dict(etcd.module_args, name="sct-placed", state="absent", instances_dir=instances_dir)
        preview = ansible.run_module("instance", args, check=True)
        assert preview["changed"] is True and not preview.get("failed"), preview
        assert "release the placement on hv-a" in preview["actions"]
        assert store.get("placement/instances/sct-placed") is not None

        removed = ansible.run_module("instance", args)
        assert removed["changed"] is True and not removed.get("failed"), removed
        assert store.get("placement/instances/sct-placed") is None
        assert sorted(store.get("placement/hosts/hv-a")["instances"]) == ["sct-kept"]
        assert ansible.run_module("instance", args)["changed"] is False
    finally:
        os.rmdir(instances_dir)


def etcd_revision(store):
    """etcd's current revision (one more per write transaction)."""
    answer = store.gateway.call("kv/range", {"key": "AA=="})
    return int(answer["header"]["revision"])


def test_a_batch_is_reserved_with_one_transaction_per_host(store, etcd):
    add_host(store, "hv-a")
    add_host(store, "hv-b")
    before = etcd_revision(store)
    result = place(etcd, [{"name": "b%d" % index, "memory": 512} for index in range(6)])
    used = set(hosts_of(result).values())
    assert len(used) == 2 and etcd_revision(store) - before == len(used)
    assert sum(len(names) for names in ledger_names(store).values()) == 6
