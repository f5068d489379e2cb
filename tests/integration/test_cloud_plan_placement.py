"""cloud_plan's placement preview on a real etcd: the declared instances' hosts as the cloud role's one-call
plan sees them, and which instances each host's instance call gets. Nothing below etcd is faked; no host
is touched (the plan stops at the placement before any other module's check)."""

import pytest

from ansible_collections.smallcloud.kvm.plugins.filter.cloud import FilterModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import hosts as host_registry
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import NoCapacity
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placing import instances_on_host
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store
from ansible_collections.smallcloud.kvm.plugins.module_utils.views import cloud_plan

pytestmark = pytest.mark.integration

CAPACITY = {"vcpus": 2, "memory_mb": 4096, "disk_gb": 100}
DECLARED = [
    {"name": "web1", "memory": 1024, "anti_affinity": "web", "image": "debian:12"},
    {"name": "web2", "memory": 1024, "anti_affinity": "web", "image": "debian:12"},
    {"name": "db", "memory": 512, "host": "h1", "image": "debian:12"},
]


@pytest.fixture(autouse=True)
def this_machine(monkeypatch):
    """This machine's capacity as the plan observes it: what the registered hosts recorded."""
    monkeypatch.setattr(host_registry, "capacity", lambda instances_dir: dict(CAPACITY))


def register(store, *names, state="active"):
    for name in names:
        store.put("hosts/" + name, {"name": name, "hostname": name, "state": state, "capacity": CAPACITY})


def plan_params(etcd, host, instances=None, hosts=("h1", "h2")):
    return dict(etcd.module_args, images=[], networks=[], floating_ips=[],
                instances={"instances": [], "uri": "qemu:///system"},
                placement={"instances": DECLARED if instances is None else instances,
                           "host": host, "hosts": list(hosts), "first_host": "h1",
                           "cpu_allocation_ratio": 4.0, "memory_allocation_ratio": 1.0,
                           "disk_allocation_ratio": 1.0})


def test_a_host_not_registered_yet_is_a_change_and_nothing_is_previewed(etcd):
    store = Store.from_params(etcd.module_args)
    register(store, "h1")
    placements, changes = cloud_plan.preview_placement(plan_params(etcd, "h1"))
    assert placements == {} and changes == [{"kind": "hosts", "name": "h2", "actions": ["register host h2"]}]
    assert sorted(store.list("")) == ["hosts/h1"]


def test_every_host_previews_the_same_placement_and_takes_its_own_batch(etcd):
    store = Store.from_params(etcd.module_args)
    register(store, "h1", "h2")
    seen = {}
    for host in ("h1", "h2"):
        params = plan_params(etcd, host)
        placements, changes = cloud_plan.preview_placement(params)
        seen[host] = (placements, [entry["name"] for entry in params["instances"]["instances"]])
        assert changes[0]["kind"] == "placement" and len(changes[0]["actions"]) == 3
        # The batch is the instance module's options: the role's keys are gone.
        assert all(not {"host", "anti_affinity"} & set(entry) for entry in params["instances"]["instances"])
    assert seen["h1"][0] == seen["h2"][0]  # deterministic: every host's plan agrees
    hosts = {name: item["host"] for name, item in seen["h1"][0].items()}
    assert hosts["db"] == "h1" and hosts["web1"] != hosts["web2"]
    assert sorted(seen["h1"][1] + seen["h2"][1]) == ["db", "web1", "web2"]
    assert sorted(store.list("")) == ["hosts/h1", "hosts/h2"]  # a preview reserves nothing


def test_a_capacity_that_changed_since_the_host_was_registered_is_a_change(etcd, monkeypatch):
    store = Store.from_params(etcd.module_args)
    register(store, "h1", "h2")
    monkeypatch.setattr(host_registry, "capacity", lambda instances_dir: dict(CAPACITY, memory_mb=8192))
    placements, changes = cloud_plan.preview_placement(plan_params(etcd, "h1"))
    assert placements == {} and changes[0]["kind"] == "hosts"
    assert changes[0]["actions"][0].startswith("refresh the capacity of host h1")


def test_placed_instances_are_no_change_and_stay_where_they_are(etcd):
    store = Store.from_params(etcd.module_args)
    register(store, "h1", "h2")
    store.put("placement/instances/web1", {"host": "h2", "reason": "earlier", "vcpus": 1, "memory_mb": 1024,
                                           "disk_gb": 0, "anti_affinity": "web", "affinity": None})
    store.put("placement/instances/web2", {"host": "h1", "reason": "earlier", "vcpus": 1, "memory_mb": 1024,
                                           "disk_gb": 0, "anti_affinity": "web", "affinity": None})
    store.put("placement/instances/db", {"host": "h1", "reason": "pinned", "vcpus": 1, "memory_mb": 512,
                                         "disk_gb": 0, "anti_affinity": None, "affinity": None})
    params = plan_params(etcd, "h2")
    placements, changes = cloud_plan.preview_placement(params)
    assert changes == [] and {name: item["new"] for name, item in placements.items()} == dict.fromkeys(
        ["web1", "web2", "db"], False)
    assert [entry["name"] for entry in params["instances"]["instances"]] == ["web1"]


def test_an_instance_that_fits_nowhere_fails_the_plan_naming_it(etcd):
    store = Store.from_params(etcd.module_args)
    register(store, "h1", "h2")
    huge = [{"name": "huge", "memory": 8192, "image": "debian:12"}]
    with pytest.raises(NoCapacity) as caught:
        cloud_plan.preview_placement(plan_params(etcd, "h1", huge))
    assert "huge" in caught.value.msg and "8192 MiB" in caught.value.msg
    assert sorted(store.list("")) == ["hosts/h1", "hosts/h2"]


def test_the_filter_is_the_plans_batch_function():
    assert FilterModule().filters()["cloud_host_instances"] is instances_on_host
    placements = {"web1": {"host": "h2"}}
    gone = {"name": "old", "state": "absent"}
    assert instances_on_host(DECLARED + [gone], placements, "h2", "h1") == [
        {"name": "web1", "memory": 1024, "image": "debian:12"}]
    # Pinned without a placement: its host; to remove and nowhere: the first host.
    assert [entry["name"] for entry in instances_on_host(DECLARED + [gone], placements, "h1", "h1")] == [
        "web2", "db", "old"]
