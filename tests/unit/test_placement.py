"""The placement choice (host/placement.py): ``choose``, ``check_ratio``, ``demand_of``, ``free_capacity``.

All pure: host records and ledgers are plain dicts here, nothing is faked because nothing below is called.
"""

import math

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (
    DEFAULT_RATIOS,
    NoCapacity,
    check_ratio,
    choose,
    demand_of,
    free_capacity,
)

pytestmark = pytest.mark.unit

GIB = 2 ** 30


def host(vcpus=4, memory_mb=8192, disk_gb=100, state="active", **ratios):
    """A host record as the host module writes it."""
    return {"state": state, "capacity": {"vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb},
            "allocation_ratios": ratios}


def demand(cpus=1, memory=1024, disk_gb=10, anti_affinity=None, affinity=None):
    return demand_of(cpus, memory, disk_gb * GIB, anti_affinity, affinity)


def ledger(**instances):
    """``ledger(web1=demand(...))``: a host's ledger holding those reservations."""
    return {"instances": instances}


# spreading and capacity ----------------------------------------------------------------------------


def test_the_host_with_the_most_free_memory_is_chosen():
    hosts = {"hv1": host(memory_mb=8192), "hv2": host(memory_mb=16384), "hv3": host(memory_mb=4096)}
    chosen, reason = choose("web", demand(), hosts, {})
    assert chosen == "hv2"
    assert "most free memory (15360 MiB after it) of 3 fitting active hosts" in reason


def test_reservations_in_a_ledger_count_against_free_memory():
    hosts = {"hv1": host(memory_mb=8192), "hv2": host(memory_mb=16384)}
    ledgers = {"hv2": ledger(big=demand(memory=12288))}
    assert choose("web", demand(), hosts, ledgers)[0] == "hv1"


def test_successive_choices_spread_instances_over_the_hosts():
    hosts = {"hv1": host(), "hv2": host(), "hv3": host()}
    ledgers = {}
    for index in range(6):
        chosen, _reason = choose("vm%d" % index, demand(), hosts, ledgers)
        ledgers.setdefault(chosen, ledger())["instances"]["vm%d" % index] = demand()
    assert sorted(len(item["instances"]) for item in ledgers.values()) == [2, 2, 2]


def test_cloud_wide_default_ratios_overcommit_cpu_four_times_and_not_memory_or_disk():
    assert DEFAULT_RATIOS == {"cpu_allocation_ratio": 4.0, "memory_allocation_ratio": 1.0,
                              "disk_allocation_ratio": 1.0}
    assert free_capacity(host(vcpus=2, memory_mb=4096, disk_gb=50), None) == {
        "vcpus": 8.0, "memory_mb": 4096.0, "disk_gb": 50.0}
    hosts = {"hv1": host(vcpus=2, memory_mb=4096, disk_gb=50)}
    assert choose("web", demand(cpus=8, memory=4096, disk_gb=50), hosts, {})[0] == "hv1"
    for too_much in (demand(cpus=9), demand(memory=4097), demand(disk_gb=51)):
        with pytest.raises(NoCapacity):
            choose("web", too_much, hosts, {})


def test_a_per_host_ratio_overrides_the_cloud_wide_default():
    hosts = {"hv1": host(memory_mb=8192, memory_allocation_ratio=1.5), "hv2": host(memory_mb=10240)}
    assert free_capacity(hosts["hv1"], None)["memory_mb"] == 12288
    chosen, _reason = choose("web", demand(memory=11264), hosts, {})
    assert chosen == "hv1"  # hv2 has more real memory, but only hv1 holds 11 GiB with its ratio


def test_cloud_wide_defaults_given_to_choose_replace_the_built_in_ones_but_not_a_host_override():
    hosts = {"hv1": host(vcpus=2), "hv2": host(vcpus=2, cpu_allocation_ratio=3.0)}
    defaults = {"cpu_allocation_ratio": 1.0}
    assert free_capacity(hosts["hv1"], None, defaults)["vcpus"] == 2
    assert free_capacity(hosts["hv2"], None, defaults)["vcpus"] == 6
    assert choose("web", demand(cpus=4), hosts, {}, defaults=defaults)[0] == "hv2"


def test_free_capacity_subtracts_every_reservation_and_may_go_negative():
    free = free_capacity(host(vcpus=1, memory_mb=1024, disk_gb=10),
                         ledger(a=demand(cpus=2, memory=1024, disk_gb=4), b=demand(cpus=3, memory=512, disk_gb=4)))
    assert free == {"vcpus": -1.0, "memory_mb": -512.0, "disk_gb": 2.0}


@pytest.mark.parametrize("state", ["draining", "drained"])
def test_hosts_not_active_take_no_new_instance(state):
    hosts = {"hv1": host(memory_mb=65536, state=state), "hv2": host(memory_mb=4096)}
    assert choose("web", demand(), hosts, {})[0] == "hv2"


def test_no_active_host_at_all_is_no_capacity_listing_the_hosts_and_their_states():
    hosts = {"hv1": host(state="draining"), "hv2": host(state="drained")}
    with pytest.raises(NoCapacity) as raised:
        choose("web", demand(), hosts, {})
    assert "web" in raised.value.msg and "hv1 (draining), hv2 (drained)" in raised.value.msg


def test_nothing_fitting_names_the_instance_its_demand_and_the_best_hosts_free_capacity():
    hosts = {"hv1": host(vcpus=2, memory_mb=2048, disk_gb=20), "hv2": host(vcpus=1, memory_mb=3072, disk_gb=5)}
    with pytest.raises(NoCapacity) as raised:
        choose("web", demand(cpus=2, memory=4096, disk_gb=10), hosts, {})
    message = raised.value.msg
    assert "instance web cannot be placed" in message
    assert "2 vCPUs, 4096 MiB memory, 10 GiB disk" in message
    assert "the best host, hv2, has 4 vCPUs, 3072 MiB memory, 5 GiB disk free" in message
    assert raised.value.details["best_host"] == "hv2"


# affinity ------------------------------------------------------------------------------------------


def test_anti_affinity_keeps_members_of_a_group_apart():
    hosts = {"hv1": host(memory_mb=65536), "hv2": host(memory_mb=4096)}
    ledgers = {"hv1": ledger(db1=demand(anti_affinity="db"))}
    assert choose("db2", demand(anti_affinity="db"), hosts, ledgers)[0] == "hv2"


def test_anti_affinity_is_hard_when_every_active_host_has_a_member():
    hosts = {"hv1": host(), "hv2": host(), "hv3": host(state="draining")}
    ledgers = {"hv1": ledger(db1=demand(anti_affinity="db")), "hv2": ledger(db2=demand(anti_affinity="db"))}
    with pytest.raises(NoCapacity) as raised:
        choose("db3", demand(anti_affinity="db"), hosts, ledgers)
    message = raised.value.msg
    assert "db3" in message and "anti_affinity group db" in message and "(hv1, hv2)" in message
    assert raised.value.details["anti_affinity"] == "db"


def test_anti_affinity_of_another_group_does_not_keep_an_instance_away():
    hosts = {"hv1": host(memory_mb=16384), "hv2": host(memory_mb=4096)}
    ledgers = {"hv1": ledger(web1=demand(anti_affinity="web"))}
    assert choose("db1", demand(anti_affinity="db"), hosts, ledgers)[0] == "hv1"


def test_affinity_prefers_a_host_with_a_member_over_more_free_memory():
    hosts = {"hv1": host(memory_mb=4096), "hv2": host(memory_mb=65536)}
    ledgers = {"hv1": ledger(app1=demand(affinity="app"))}
    chosen, reason = choose("app2", demand(affinity="app"), hosts, ledgers)
    assert chosen == "hv1"
    assert reason.startswith("affinity group app is there; ")


def test_affinity_is_soft_and_falls_back_when_the_members_host_is_full():
    hosts = {"hv1": host(memory_mb=2048), "hv2": host(memory_mb=8192)}
    ledgers = {"hv1": ledger(app1=demand(memory=2048, affinity="app"))}
    chosen, reason = choose("app2", demand(affinity="app"), hosts, ledgers)
    assert chosen == "hv2"
    assert "no fitting host has a member of affinity group app yet" in reason


# pinned --------------------------------------------------------------------------------------------


def test_a_pinned_active_host_is_chosen_even_when_full():
    hosts = {"hv1": host(memory_mb=1024), "hv2": host(memory_mb=65536)}
    ledgers = {"hv1": ledger(big=demand(memory=1024))}
    assert choose("web", demand(memory=4096), hosts, ledgers, pinned="hv1") == ("hv1", "pinned by its host key")


def test_a_pinned_unknown_host_is_invalid_input_naming_it_and_the_registered_hosts():
    hosts = {"hv1": host(), "hv2": host(state="draining")}
    with pytest.raises(InvalidInput) as raised:
        choose("web", demand(), hosts, {}, pinned="hv9")
    assert "hv9" in raised.value.msg and "web" in raised.value.msg
    assert "hv1 (active), hv2 (draining)" in raised.value.msg


def test_a_pinned_draining_host_is_no_capacity_naming_the_active_hosts():
    hosts = {"hv1": host(), "hv2": host(state="draining")}
    with pytest.raises(NoCapacity) as raised:
        choose("web", demand(), hosts, {}, pinned="hv2")
    assert "host hv2 is draining" in raised.value.msg and "active hosts: hv1" in raised.value.msg


# ratios and demands --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(1, 1.0), (2.5, 2.5), ("4", 4.0), ("1.5", 1.5)])
def test_check_ratio_accepts_numbers_and_numeric_strings_from_one_up(value, expected):
    assert check_ratio("cpu_allocation_ratio", value) == expected


@pytest.mark.parametrize("value", [
    pytest.param(0.5, id="below 1"),
    pytest.param(0, id="zero"),
    pytest.param(-2, id="negative"),
    pytest.param("abc", id="not a number"),
    pytest.param(True, id="a bool"),
    pytest.param(math.inf, id="infinite"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(None, id="None"),
    pytest.param([2], id="a list"),
])
def test_check_ratio_refuses_naming_the_option_the_value_and_what_is_allowed(value):
    with pytest.raises(InvalidInput) as raised:
        check_ratio("memory_allocation_ratio", value)
    message = raised.value.msg
    assert "memory_allocation_ratio" in message and repr(value) in message and "a number >= 1" in message
    assert list(raised.value.details) == ["memory_allocation_ratio"]


@pytest.mark.parametrize("disk_bytes, gib", [
    (None, 0), (0, 0), (1, 1), (GIB, 1), (GIB + 1, 2), (10 * GIB - 512, 10), (int(1.5 * GIB), 2),
])
def test_demand_of_rounds_disk_bytes_up_to_whole_gib(disk_bytes, gib):
    assert demand_of(2, 1024, disk_bytes)["disk_gb"] == gib


def test_demand_of_keeps_the_groups_and_drops_empty_ones():
    expected = {"vcpus": 2, "memory_mb": 512, "disk_gb": 0, "anti_affinity": "db", "affinity": None}
    assert demand_of("2", "512", 0, "db", "") == expected
