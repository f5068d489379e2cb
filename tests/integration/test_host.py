"""The host module on a real scratch namespace (its underlay) and real etcd, driven through Ansible."""

import socket

import pytest
from test_network import ip, lab_context, store_for

pytestmark = pytest.mark.integration
lab_fixture = pytest.fixture(lab_context, name="lab")


def test_host_registration_lifecycle(ansible, etcd, lab):
    hv = lab.hypervisor()  # ul0 10.99.0.1/24, its veth peer ul0p in the same namespace
    ip("-n", hv, "route", "add", "default", "via", "10.99.0.254", "dev", "ul0")
    store = store_for(etcd)
    args = dict(etcd.module_args, name="hv-test", host_netns=hv, virt_type="qemu")
    want = {"name": "hv-test", "hostname": socket.gethostname(), "underlay_interface": "ul0",
            "underlay_address": "10.99.0.1", "virt_type": "qemu", "state": "active"}

    # Check mode previews the record (underlay from the default route) and writes nothing.
    checked = ansible.run_module("host", args, check=True, diff=True)
    assert checked["changed"] is True and checked["host"] == want, checked.get("msg")
    assert checked["diff"]["after"]["record"] == want and store.get("hosts/hv-test") is None

    applied = ansible.run_module("host", args, diff=True)
    assert applied["changed"] is True and applied["host"] == want, applied.get("msg")
    assert store.get("hosts/hv-test") == want
    assert ansible.run_module("host", args)["changed"] is False

    # Another underlay interface: only what differs is in the diff; virt_type, not given, is kept.
    ip("-n", hv, "addr", "add", "10.98.0.1/24", "dev", "ul0p")
    moved = dict(args, underlay_interface="ul0p")
    del moved["virt_type"]
    updated = ansible.run_module("host", moved, diff=True)
    assert updated["changed"] is True, updated.get("msg")
    assert updated["diff"]["after"] == {"underlay_interface": "ul0p", "underlay_address": "10.98.0.1"}
    assert store.get("hosts/hv-test") == dict(want, underlay_interface="ul0p", underlay_address="10.98.0.1")

    # Bad input names the value and writes nothing.
    keys = store.list("")
    bad = ansible.run_module("host", dict(args, underlay_interface="nope0"))
    assert bad["failed"] and "nope0" in bad["msg"]
    bad = ansible.run_module("host", dict(args, name="no/slash"))
    assert bad["failed"] and "no/slash" in bad["msg"]
    assert store.list("") == keys

    # Removal is refused while an instance record places a guest here, then done; a second one is a no-op.
    gone = dict(etcd.module_args, name="hv-test", state="absent")
    store.put("instances/vm1", {"name": "vm1", "host": "hv-test"})
    refused = ansible.run_module("host", gone)
    assert refused["failed"] and "vm1" in refused["msg"] and refused["instances"] == ["vm1"], refused
    store.delete("instances/vm1")
    preview = ansible.run_module("host", gone, check=True)
    assert preview["changed"] is True and store.get("hosts/hv-test") is not None
    removed = ansible.run_module("host", gone)
    assert removed["changed"] is True and removed["host"] is None, removed.get("msg")
    assert ansible.run_module("host", gone)["changed"] is False
    assert etcd.key_count() == 0, store.list("")
