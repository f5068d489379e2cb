"""The host module on a real scratch namespace (its underlay) and real etcd, driven through Ansible."""

import socket

import pytest
from test_network import ip, lab_context, store_for

from ansible_collections.smallcloud.kvm.plugins.module_utils.host import hosts

pytestmark = pytest.mark.integration
lab_fixture = pytest.fixture(lab_context, name="lab")


def test_host_registration_lifecycle(ansible, etcd, lab):
    hv = lab.hypervisor()  # ul0 10.99.0.1/24, its veth peer ul0p in the same namespace
    ip("-n", hv, "route", "add", "default", "via", "10.99.0.254", "dev", "ul0")
    store = store_for(etcd)
    args = dict(etcd.module_args, name="hv-test", host_netns=hv, virt_type="qemu")
    want = {"name": "hv-test", "hostname": socket.gethostname(), "underlay_interface": "ul0",
            "underlay_address": "10.99.0.1", "virt_type": "qemu", "state": "active",
            # What placement reads: this machine's CPUs, memory and the file system of the instances directory.
            "capacity": hosts.capacity("/var/lib/smallcloud/instances"), "allocation_ratios": {}}

    # Check mode previews the record (underlay from the default route) and writes nothing.
    checked = ansible.run_module("host", args, check=True, diff=True)
    assert checked["changed"] is True and checked["host"] == want, checked.get("msg")
    assert checked["diff"]["after"]["record"] == want and store.get("hosts/hv-test") is None

    applied = ansible.run_module("host", args, diff=True)
    assert applied["changed"] is True and applied["host"] == want, applied.get("msg")
    assert store.get("hosts/hv-test") == want
    assert ansible.run_module("host", args)["changed"] is False

    # Draining takes the host out of placement (refused for the last active host); its own ratio is recorded and
    # kept when not given again.
    alone = ansible.run_module("host", dict(args, status="draining"))
    assert alone["failed"] and "hv-test is the last active host" in alone["msg"], alone
    store.put("hosts/hv-other", {"name": "hv-other", "state": "active"})
    drained = ansible.run_module("host", dict(args, status="draining", cpu_allocation_ratio=8), diff=True)
    assert drained["diff"]["after"] == {"state": "draining", "allocation_ratios": {"cpu_allocation_ratio": 8.0}}
    assert ansible.run_module("host", args)["changed"] is False
    back = ansible.run_module("host", dict(args, status="active"))
    assert back["host"]["state"] == "active" and back["host"]["allocation_ratios"] == {"cpu_allocation_ratio": 8.0}
    want["allocation_ratios"] = {"cpu_allocation_ratio": 8.0}
    store.delete("hosts/hv-other")

    # Another underlay interface: only what differs is in the diff; virt_type, not given, is kept.
    ip("-n", hv, "addr", "add", "10.98.0.1/24", "dev", "ul0p")
    moved = dict(args, underlay_interface="ul0p")
    del moved["virt_type"]
    updated = ansible.run_module("host", moved, diff=True)
    assert updated["changed"] is True, updated.get("msg")
    assert updated["diff"]["after"] == {"underlay_interface": "ul0p", "underlay_address": "10.98.0.1"}, updated
    assert store.get("hosts/hv-test") == dict(want, underlay_interface="ul0p", underlay_address="10.98.0.1")

    # Bad input names the value and writes nothing.
    keys = store.list("")
    bad = ansible.run_module("host", dict(args, underlay_interface="nope0"))
    assert bad["failed"] and "nope0" in bad["msg"]
    bad = ansible.run_module("host", dict(args, name="no/slash"))
    assert bad["failed"] and "no/slash" in bad["msg"]
    bad = ansible.run_module("host", dict(args, cpu_allocation_ratio=0.5))
    assert bad["failed"] and "cpu_allocation_ratio 0.5" in bad["msg"] and ">= 1" in bad["msg"], bad["msg"]
    assert store.list("") == keys

    # Removal is refused while an instance record places a guest here, then done; a second one is a no-op.
    gone = dict(etcd.module_args, name="hv-test", state="absent")
    store.put("instances/vm1", {"name": "vm1", "host": "hv-test"})
    refused = ansible.run_module("host", gone)
    assert refused["failed"] and "vm1" in refused["msg"] and refused["instances"] == ["vm1"], refused
    store.delete("instances/vm1")
    store.put("placement/hosts/hv-test", {"instances": {"vm2": {"vcpus": 1}}})
    refused = ansible.run_module("host", gone)
    assert refused["failed"] and "vm2" in refused["msg"], refused
    store.delete("placement/hosts/hv-test")
    preview = ansible.run_module("host", gone, check=True)
    assert preview["changed"] is True and store.get("hosts/hv-test") is not None
    removed = ansible.run_module("host", gone)
    assert removed["changed"] is True and removed["host"] is None, removed.get("msg")
    assert ansible.run_module("host", gone)["changed"] is False
    assert etcd.key_count() == 0, store.list("")
