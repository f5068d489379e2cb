"""The cloud role's one-call plan: the network options it shares with the role's tasks, and cloud_plan running
each entry's own module code in check mode, validated by that module's own spec."""

import pytest

from ansible_collections.smallcloud.kvm.plugins.filter.cloud import cloud_network_calls
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import validated_options
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.views import cloud_plan

pytestmark = pytest.mark.unit

NETWORKS = [
    {"name": "web", "cidr": "10.0.0.0/24", "gateway_host": "h1", "nat": True},
    {"name": "db", "cidr": "10.1.0.0/24", "mesh_peers": ["192.0.2.9"], "underlay_interface": "eth1"},
]


def test_network_calls_carry_gateway_mesh_and_underlay_and_drop_the_role_keys():
    on_h1 = cloud_network_calls(NETWORKS, ["web"], ["h1", "h2"], "eth0")
    assert on_h1 == [
        {"name": "web", "cidr": "10.0.0.0/24", "nat": True, "gateway": True, "mesh_hosts": ["h1", "h2"],
         "underlay_interface": "eth0"},
        {"name": "db", "cidr": "10.1.0.0/24", "mesh_peers": ["192.0.2.9"], "underlay_interface": "eth1",
         "gateway": False},
    ]
    assert "underlay_interface" not in cloud_network_calls(NETWORKS[:1], [], ["h1"])[0]


PARAMS = {"images": [{"url": "http://x/i.qcow2", "cache_dir": "/c"}],
          "networks": [{"name": "web", "cidr": "10.0.0.0/24"}],
          "instances": {"instances": [{"name": "vm", "image": "http://x/i.qcow2"}]},
          "floating_ips": [{"network": "web", "instance": "vm"}],
          "etcd_endpoints": ["https://e:2379"], "etcd_prefix": "/p", "etcd_ca_cert": None}


def test_entries_share_the_etcd_options_except_with_the_image_cache_and_skip_an_empty_batch():
    listed = list(cloud_plan.entries(PARAMS))
    assert [(kind, index) for kind, index, _options in listed] == [
        ("images", 0), ("networks", 0), ("instances", 0), ("floating_ips", 0)]
    options = {kind: opts for kind, _index, opts in listed}
    assert "etcd_endpoints" not in options["images"]
    assert options["networks"]["etcd_endpoints"] == ["https://e:2379"] and "etcd_ca_cert" not in options["networks"]
    assert options["instances"]["etcd_prefix"] == "/p"
    empty = dict(PARAMS, instances={"instances": [], "uri": "qemu:///system"})
    assert "instances" not in [kind for kind, _index, _options in cloud_plan.entries(empty)]


def test_each_entry_is_validated_by_its_own_module_spec():
    from ansible_collections.smallcloud.kvm.plugins.module_utils.network import networks

    checked = validated_options(networks.MODULE_SPEC, {"name": "web", "cidr": "10.0.0.0/24"}, "networks[0]")
    assert checked["dhcp"] is True and checked["dns"] is True and checked["state"] == "present"  # defaults
    with pytest.raises(InvalidInput) as caught:
        validated_options(networks.MODULE_SPEC, {"name": "web", "colour": "red"}, "networks[1]")
    assert caught.value.msg.startswith("networks[1]: ") and "colour" in caught.value.msg


def test_run_plans_entries_in_check_mode_up_to_the_first_change_and_changes_nothing(monkeypatch):
    calls = []

    class Runner:
        def __init__(self, kind, changed):
            self.kind, self.changed = kind, changed
            self.MODULE_SPEC = {"argument_spec": {"name": {"type": "str"}, "url": {"type": "str"}}}

        def run(self, module):
            calls.append((self.kind, module.check_mode, dict(module.params)))
            module.warn("%s looked" % self.kind)
            return {"changed": self.changed, "actions": ["would do %s" % self.kind] if self.changed else []}

    monkeypatch.setattr(cloud_plan, "KINDS", {
        "images": (Runner("images", False), lambda params: params["url"]),
        "networks": (Runner("networks", True), lambda params: params["name"]),
        "instances": (Runner("instances", True), lambda params: "batch"),
        "floating_ips": (Runner("floating_ips", False), lambda params: "fip"),
    })
    monkeypatch.setattr(cloud_plan, "ETCD_ARGS", {})
    warnings = []

    class Module:
        params = {"images": [{"url": "http://x/i"}], "networks": [{"name": "web"}],
                  "instances": {"instances": [{"name": "vm"}]}, "floating_ips": []}

        @staticmethod
        def warn(text):
            warnings.append(text)

    result = cloud_plan.run(Module())
    assert result == {"changed": False, "would_change": True,
                      "changes": [{"kind": "networks", "name": "web", "actions": ["would do networks"]}],
                      "placements": {}}
    # It stops at the first change: the instance batch (which might need that network) is not checked.
    assert [(kind, check_mode) for kind, check_mode, _params in calls] == [("images", True), ("networks", True)]
    assert warnings == ["images looked", "networks looked"]
