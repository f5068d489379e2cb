"""The host registry runner (host/hosts.py): the record planned from the underlay and the store, then applied.

Below the runner: an in-memory store and a fake netlink handle with one underlay interface and a default route.
"""

import pytest
from harness.memory_store import MemoryStore
from harness.module_stub import ModuleStub

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import hosts

pytestmark = pytest.mark.unit

HOSTNAME = "hv1.example.org"
RECORD = {"name": "hv1", "hostname": HOSTNAME, "underlay_interface": "ul0", "underlay_address": "10.99.0.1",
          "virt_type": "kvm", "state": "active", "capacity": {"vcpus": 4, "memory_mb": 8192, "disk_gb": 100},
          "allocation_ratios": {}}


class FakeNetDev:
    """The NetDev reads underlay_of makes: links, one link, its IPv4 addresses, the default route's device."""

    def __init__(self, links=None, default="ul0"):
        self.link_set = links if links is not None else {"lo": ["127.0.0.1/8"], "ul0": ["10.99.0.1/24"],
                                                         "up0": ["198.51.100.2/24"], "bare0": []}
        self.default = default

    def links(self):
        return {name: {"mtu": 1500} for name in self.link_set}

    def link(self, name):
        return self.links().get(name)

    def addresses(self, name):
        return sorted(self.link_set.get(name, []))

    def default_route_device(self):
        return self.default


class FakeHandles:
    """Handles.get for one namespace; remembers which namespaces were asked for."""

    def __init__(self, netdev=None):
        self.netdev = netdev or FakeNetDev()
        self.asked = []

    def get(self, netns):
        self.asked.append(netns)
        return self.netdev


@pytest.fixture(autouse=True)
def hostname(monkeypatch):
    """This machine's host name and capacity, as the runner reads them."""
    monkeypatch.setattr(hosts.socket, "gethostname", lambda: HOSTNAME)
    monkeypatch.setattr(hosts, "capacity", lambda instances_dir: dict(RECORD["capacity"]))


def converge(store, check_mode=False, handles=None, **params):
    """One run of the module with canonical option names on ``store``."""
    module = ModuleStub(hosts.MODULE_SPEC, check_mode=check_mode, **dict({"name": "hv1"}, **params))
    return hosts.converge(module, store, handles or FakeHandles())


# present -------------------------------------------------------------------------------------------


def test_a_new_host_is_registered_with_its_underlay_and_state_active():
    store = MemoryStore()
    result = converge(store, underlay_interface="ul0", virt_type="kvm")
    assert result["changed"] is True and result["actions"] == ["register host hv1 (10.99.0.1)"]
    assert store.get("hosts/hv1") == RECORD == result["host"]
    assert result["diff"] == {"before": {"record": None}, "after": {"record": RECORD}}
    assert store.locked == ["host/hv1"]


def test_a_second_run_with_the_same_input_changes_nothing():
    store = MemoryStore({"hosts/hv1": RECORD})
    result = converge(store, underlay_interface="ul0", virt_type="kvm")
    assert (result["changed"], result["actions"], result["diff"]) == (False, [], {"before": {}, "after": {}})
    assert result["host"] == RECORD


def test_name_and_underlay_default_to_the_hostname_and_the_default_route_device():
    store = MemoryStore()
    module = ModuleStub(hosts.MODULE_SPEC)
    result = hosts.converge(module, store, FakeHandles(FakeNetDev(default="up0")))
    assert result["host"]["name"] == HOSTNAME
    assert store.get("hosts/%s" % HOSTNAME)["underlay_interface"] == "up0"
    assert store.get("hosts/%s" % HOSTNAME)["underlay_address"] == "198.51.100.2"


def test_the_underlay_is_read_in_host_netns():
    handles = FakeHandles()
    converge(MemoryStore(), handles=handles, host_netns="sct-hv")
    assert handles.asked == ["sct-hv"]


def test_a_changed_underlay_updates_only_what_differs():
    store = MemoryStore({"hosts/hv1": RECORD})
    result = converge(store, underlay_interface="up0")
    assert result["actions"] == ["update host hv1: underlay_address, underlay_interface"]
    assert result["diff"] == {"before": {"underlay_address": "10.99.0.1", "underlay_interface": "ul0"},
                              "after": {"underlay_address": "198.51.100.2", "underlay_interface": "up0"}}
    assert store.get("hosts/hv1") == dict(RECORD, underlay_interface="up0", underlay_address="198.51.100.2")


def test_virt_type_is_kept_unless_given_and_updated_when_given():
    store = MemoryStore({"hosts/hv1": RECORD})
    assert converge(store, underlay_interface="ul0")["changed"] is False
    result = converge(store, underlay_interface="ul0", virt_type="qemu")
    assert result["diff"] == {"before": {"virt_type": "kvm"}, "after": {"virt_type": "qemu"}}
    assert store.get("hosts/hv1")["virt_type"] == "qemu"


def test_the_recorded_state_and_keys_of_other_modules_are_kept():
    kept = dict(RECORD, state="draining", evacuated_to={"web": "hv2"})
    store = MemoryStore({"hosts/hv1": dict(kept, hostname="old-name")})
    result = converge(store, underlay_interface="ul0")
    assert result["diff"] == {"before": {"hostname": "old-name"}, "after": {"hostname": HOSTNAME}}
    assert store.get("hosts/hv1") == kept


@pytest.mark.parametrize("before", [
    pytest.param({}, id="a new host"),
    pytest.param({"hosts/hv1": dict(RECORD, underlay_address="10.99.0.9")}, id="a changed host"),
    pytest.param({"hosts/hv1": RECORD, "instances/vm1": {"name": "vm1", "host": "elsewhere"}},
                 id="a host to remove"),
])
def test_check_mode_reports_the_change_and_changes_nothing(before):
    store = MemoryStore(before)
    state = "absent" if "instances/vm1" in before else "present"
    result = converge(store, check_mode=True, underlay_interface="ul0", virt_type="kvm", state=state)
    assert result["changed"] is True and result["actions"] and result["diff"]["before"] != result["diff"]["after"]
    assert store.data == before


def test_a_record_created_meanwhile_is_a_conflict_not_overwritten():
    store = MemoryStore()
    store.create = lambda path, value: False  # another run (without the lock) created it between read and write
    with pytest.raises(Conflict, match="hosts/hv1"):
        converge(store, underlay_interface="ul0")


# absent --------------------------------------------------------------------------------------------


def test_absent_deletes_the_record():
    store = MemoryStore({"hosts/hv1": RECORD})
    result = converge(store, state="absent")
    assert result["changed"] is True and result["actions"] == ["deregister host hv1"]
    assert result["diff"] == {"before": {"record": RECORD}, "after": {"record": None}}
    assert store.data == {} and result["host"] is None


def test_absent_of_a_host_not_registered_is_a_no_op_and_reads_no_underlay():
    handles = FakeHandles()
    result = converge(MemoryStore(), state="absent", handles=handles)
    assert (result["changed"], result["actions"], result["host"]) == (False, [], None)
    assert handles.asked == []


@pytest.mark.parametrize("placed_on", [
    pytest.param("hv1", id="an instance placed by registry name"),
    pytest.param(HOSTNAME, id="an instance placed by host name"),
])
def test_absent_is_refused_while_an_instance_record_names_the_host(placed_on):
    before = {"hosts/hv1": RECORD, "instances/vm2": {"name": "vm2", "host": placed_on},
              "instances/vm1": {"name": "vm1", "host": placed_on}, "instances/vm3": {"name": "vm3", "host": "hv2"}}
    store = MemoryStore(before)
    with pytest.raises(Conflict) as raised:
        converge(store, state="absent")
    assert "vm1, vm2" in raised.value.msg and "hv1" in raised.value.msg
    assert raised.value.details["instances"] == ["vm1", "vm2"]
    assert store.data == before


# bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, named", [
    pytest.param(dict(name="a/b"), "a/b", id="a name with a slash"),
    pytest.param(dict(name="-hv"), "-hv", id="a name starting with a dash"),
    pytest.param(dict(name="h" * 64), "h" * 64, id="a name longer than 63 characters"),
    pytest.param(dict(underlay_interface="nope0"), "nope0", id="an interface that does not exist"),
    pytest.param(dict(underlay_interface="bare0"), "bare0", id="an interface without an IPv4 address"),
])
def test_bad_input_fails_naming_the_value_before_etcd_is_touched(params, named):
    store = MemoryStore()
    with pytest.raises(InvalidInput) as raised:
        converge(store, **params)
    assert named in raised.value.msg
    assert store.data == {} and store.locked == []


def test_no_default_route_and_no_interface_says_what_to_set():
    with pytest.raises(InvalidInput, match="underlay_interface is not set"):
        converge(MemoryStore(), handles=FakeHandles(FakeNetDev(default=None)))


def test_an_unknown_interface_lists_the_interfaces_there_are():
    with pytest.raises(InvalidInput) as raised:
        converge(MemoryStore(), underlay_interface="nope0")
    assert "bare0, lo, ul0, up0" in raised.value.msg and raised.value.details == {"underlay_interface": "nope0"}


# status, capacity and ratios -----------------------------------------------------------------------


def test_status_draining_sets_the_state_and_a_rerun_is_unchanged():
    store = MemoryStore({"hosts/hv1": RECORD, "hosts/hv2": dict(RECORD, name="hv2")})
    result = converge(store, underlay_interface="ul0", status="draining")
    assert result["changed"] is True and result["actions"] == ["update host hv1: state"]
    assert result["diff"] == {"before": {"state": "active"}, "after": {"state": "draining"}}
    assert store.get("hosts/hv1") == dict(RECORD, state="draining")
    assert converge(store, underlay_interface="ul0", status="draining")["changed"] is False
    assert converge(store, underlay_interface="ul0")["changed"] is False  # not given: kept
    assert converge(store, underlay_interface="ul0", status="active")["changed"] is True
    assert store.get("hosts/hv1")["state"] == "active"


def test_ratios_given_are_recorded_and_kept_when_not_given():
    store = MemoryStore({"hosts/hv1": RECORD})
    result = converge(store, underlay_interface="ul0", cpu_allocation_ratio=2)
    assert result["changed"] is True
    assert store.get("hosts/hv1")["allocation_ratios"] == {"cpu_allocation_ratio": 2.0}
    converge(store, underlay_interface="ul0", memory_allocation_ratio="1.5")
    assert store.get("hosts/hv1")["allocation_ratios"] == {"cpu_allocation_ratio": 2.0,
                                                           "memory_allocation_ratio": 1.5}
    assert converge(store, underlay_interface="ul0")["changed"] is False
    assert converge(store, underlay_interface="ul0", cpu_allocation_ratio="2.0")["changed"] is False
    assert store.get("hosts/hv1")["allocation_ratios"] == {"cpu_allocation_ratio": 2.0,
                                                           "memory_allocation_ratio": 1.5}


def test_a_changed_capacity_is_recorded(monkeypatch):
    store = MemoryStore({"hosts/hv1": RECORD})
    bigger = {"vcpus": 8, "memory_mb": 16384, "disk_gb": 200}
    monkeypatch.setattr(hosts, "capacity", lambda instances_dir: dict(bigger))
    result = converge(store, underlay_interface="ul0")
    assert result["actions"] == ["update host hv1: capacity"]
    assert store.get("hosts/hv1")["capacity"] == bigger


@pytest.mark.parametrize("option, value", [
    pytest.param("cpu_allocation_ratio", 0.5, id="cpu below 1"),
    pytest.param("memory_allocation_ratio", "abc", id="memory not a number"),
    pytest.param("disk_allocation_ratio", 0, id="disk zero"),
])
def test_a_bad_ratio_fails_naming_it_before_anything_is_written(option, value):
    store = MemoryStore({"hosts/hv1": RECORD})
    with pytest.raises(InvalidInput) as raised:
        converge(store, underlay_interface="ul0", **{option: value})
    assert option in raised.value.msg and repr(value) in raised.value.msg
    assert store.data == {"hosts/hv1": RECORD} and store.locked == []


def test_memory_mib_reads_memtotal_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:         1234567 kB\nMemTotal:       16337916 kB\n", encoding="ascii")
    assert hosts.memory_mib(str(meminfo)) == 15954  # 15954.99 MiB: whole MiB, rounded down


def test_memory_mib_without_memtotal_names_the_file(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:         1234567 kB\n", encoding="ascii")
    with pytest.raises(HostError, match=str(meminfo)):
        hosts.memory_mib(str(meminfo))


def test_capacity_measures_the_nearest_existing_parent_of_instances_dir(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real capacity, not the autouse fixture's
    found = hosts.capacity(str(tmp_path / "not" / "there" / "yet"))
    assert set(found) == {"vcpus", "memory_mb", "disk_gb"}
    assert found["vcpus"] >= 1 and found["memory_mb"] == hosts.memory_mib() and found["disk_gb"] >= 0


def test_absent_is_refused_while_the_hosts_ledger_still_holds_instances():
    ledger = {"instances": {"db1": {"vcpus": 1, "memory_mb": 512, "disk_gb": 0}, "web1": {"vcpus": 1}}}
    before = {"hosts/hv1": RECORD, "placement/hosts/hv1": ledger, "instances/web1": {"name": "web1", "host": "hv1"}}
    store = MemoryStore(before)
    with pytest.raises(Conflict) as raised:
        converge(store, state="absent")
    assert "hv1" in raised.value.msg and "web1, db1" in raised.value.msg
    assert raised.value.details["instances"] == ["web1", "db1"]
    assert store.data == before


def test_draining_the_last_active_host_is_refused_and_changes_nothing():
    store = MemoryStore({"hosts/hv1": RECORD, "hosts/hv2": dict(RECORD, name="hv2", state="draining")})
    with pytest.raises(InvalidInput) as caught:
        converge(store, underlay_interface="ul0", status="draining")
    assert "hv1 is the last active host" in caught.value.msg
    assert store.get("hosts/hv1") == RECORD


def test_draining_a_drained_host_is_refused_until_it_is_active_again():
    store = MemoryStore({"hosts/hv1": dict(RECORD, state="drained"), "hosts/hv2": dict(RECORD, name="hv2")})
    with pytest.raises(InvalidInput) as caught:
        converge(store, underlay_interface="ul0", status="draining")
    assert "hv1 is drained already" in caught.value.msg
    assert converge(store, underlay_interface="ul0", status="active")["host"]["state"] == "active"


def test_drained_is_refused_while_instances_are_still_there():
    store = MemoryStore({"hosts/hv1": dict(RECORD, state="draining"), "hosts/hv2": dict(RECORD, name="hv2"),
                         "instances/web": {"name": "web", "host": HOSTNAME}})
    with pytest.raises(Conflict) as caught:
        converge(store, underlay_interface="ul0", status="drained")
    assert "web" in caught.value.msg and store.get("hosts/hv1")["state"] == "draining"
