"""The inventory plugin smallcloud.kvm.cloud: records -> hosts, variables and groups, without etcd.

The records come from an in-memory store read through the plugin's own ``read_records``; ``populate`` runs
on Ansible's InventoryData with the plugin's options set directly (the full parse() against etcd, with the
cache and the option file, is tests/integration/test_inventory_cloud.py).
"""

import re

import pytest
from ansible.errors import AnsibleError, AnsibleParserError
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.template import trust_as_template
from harness.memory_store import MemoryStore

from ansible_collections.smallcloud.kvm.plugins.inventory import cloud
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import StoreUnreachable

pytestmark = pytest.mark.unit

RECORDS = {
    "networks/web": {"name": "web", "cidr": "10.0.0.0/24", "vni": 0xA1, "gateway_vtep": "192.0.2.1"},
    "networks/db": {"name": "db", "cidr": "10.1.0.0/24", "vni": 0xB2, "gateway_vtep": "192.0.2.2"},
    "instances/web1": {
        "name": "web1", "uuid": "u-web1", "host": "hv-1.example", "state": "running", "image": "debian:12",
        "interfaces": [{"network": "web", "mac": "02:73:63:00:00:01", "ip": "10.0.0.5"},
                       {"network": "db", "mac": "02:73:63:00:00:02", "ip": "10.1.0.5"}],
        "cpus": 1, "memory": 512, "metadata": {"role": "web", "environment": "prod"}, "security_groups": ["web"],
    },
    "instances/web2": {
        "name": "web2", "uuid": "u-web2", "host": "hv-2", "state": "stopped", "image": "debian:12",
        "interfaces": [{"network": "web", "mac": "02:73:63:00:00:03", "ip": "10.0.0.6"}],
        "metadata": {"role": "web", "environment": "staging"},
    },
    "instances/db1": {
        "name": "db1", "uuid": "u-db1", "host": "hv-2", "state": "running", "image": "https://example.org/tiny.qcow2",
        "interfaces": [{"network": "db", "mac": "02:73:63:00:00:04", "ip": "10.1.0.7"}],
    },
    "instances/web1/nested": {"not": "an instance"},
    "floating_ips/203.0.113.10": {"address": "203.0.113.10", "pool": "203.0.113.0/24", "network": "web",
                                  "instance": "web1", "fixed_ip": "10.0.0.5"},
    # mapped by address only: still web2's floating IP
    "floating_ips/203.0.113.11": {"address": "203.0.113.11", "pool": "203.0.113.0/24", "network": "web",
                                  "instance": None, "fixed_ip": "10.0.0.6"},
    # same fixed address on another network: not db1's
    "floating_ips/203.0.113.12": {"address": "203.0.113.12", "pool": "203.0.113.0/24", "network": "web",
                                  "instance": None, "fixed_ip": "10.1.0.7"},
}


@pytest.fixture
def listing():
    return cloud.read_records(MemoryStore(RECORDS))


def entries_by_name(listing, **filters):
    return {entry["name"]: entry for entry in cloud.inventory_entries(listing, **filters)}


# records -> entries ------------------------------------------------------------------------------


def test_read_records_keeps_only_the_three_listings_top_records(listing):
    assert sorted(listing) == ["floating_ips", "instances", "networks"]
    assert sorted(listing["instances"]) == ["db1", "web1", "web2"]
    assert sorted(listing["networks"]) == ["db", "web"]
    assert len(listing["floating_ips"]) == 3


def test_host_vars_of_an_instance_with_a_floating_ip(listing):
    web1 = entries_by_name(listing)["web1"]["vars"]
    assert web1 == {
        "smallcloud_uuid": "u-web1",
        "smallcloud_hypervisor": "hv-1.example",
        "smallcloud_networks": ["web", "db"],
        "smallcloud_interfaces": [{"network": "web", "ip": "10.0.0.5", "mac": "02:73:63:00:00:01"},
                                  {"network": "db", "ip": "10.1.0.5", "mac": "02:73:63:00:00:02"}],
        "smallcloud_ips": ["10.0.0.5", "10.1.0.5"],
        "smallcloud_macs": ["02:73:63:00:00:01", "02:73:63:00:00:02"],
        "smallcloud_image": "debian:12",
        "smallcloud_state": "running",
        "smallcloud_floating_ips": ["203.0.113.10"],
        "smallcloud_metadata": {"role": "web", "environment": "prod"},
        "smallcloud_security_groups": ["web"],
        "smallcloud_gateways": {
            "web": {"vtep": "192.0.2.1", "namespace": "scnet-a1", "ip": "10.0.0.1"},
            "db": {"vtep": "192.0.2.2", "namespace": "scnet-b2", "ip": "10.1.0.1"},
        },
        "ansible_host": "203.0.113.10",
    }


@pytest.mark.parametrize(("name", "ansible_host", "floating"), [
    ("web1", "203.0.113.10", ["203.0.113.10"]),  # by instance name
    ("web2", "203.0.113.11", ["203.0.113.11"]),  # by fixed IP on the same network
    ("db1", "10.1.0.7", []),  # no floating IP: the first fixed IP
])
def test_ansible_host_is_the_floating_ip_else_the_first_fixed_ip(listing, name, ansible_host, floating):
    variables = entries_by_name(listing)[name]["vars"]
    assert variables["ansible_host"] == ansible_host
    assert variables["smallcloud_floating_ips"] == floating


def test_an_instance_without_addresses_has_no_ansible_host():
    listing = {"instances": {"bare": {"name": "bare", "interfaces": [{"network": "gone", "mac": None, "ip": None}]}}}
    (entry,) = cloud.inventory_entries(listing)
    assert "ansible_host" not in entry["vars"]
    assert entry["vars"]["smallcloud_ips"] == [] and entry["vars"]["smallcloud_gateways"] == {}
    assert entry["groups"] == ["smallcloud", "network_gone"]


def test_default_groups_are_raw_names_and_can_be_turned_off(listing):
    assert entries_by_name(listing)["web1"]["groups"] == [
        "smallcloud", "network_web", "network_db", "hypervisor_hv-1.example", "state_running", "image_debian:12"]
    assert all(entry["groups"] == [] for entry in cloud.inventory_entries(listing, groups=False))


@pytest.mark.parametrize(("filters", "names"), [
    ({}, ["db1", "web1", "web2"]),
    ({"states": ["running"]}, ["db1", "web1"]),
    ({"networks": ["db"]}, ["db1", "web1"]),
    ({"hypervisors": ["hv-2"]}, ["db1", "web2"]),
    ({"states": ["running"], "networks": ["web"], "hypervisors": ["hv-2"]}, []),
    ({"states": ["running", "stopped"], "networks": ["web", "db"]}, ["db1", "web1", "web2"]),
    ({"metadata": {"role": "web"}}, ["web1", "web2"]),
    ({"metadata": {"role": "web", "environment": "prod"}}, ["web1"]),
    ({"metadata": {"role": "db"}}, []),
])
def test_filters_combine_and_empty_means_all(listing, filters, names):
    assert [entry["name"] for entry in cloud.inventory_entries(listing, **filters)] == names


def test_namespace_prefix_names_the_gateway_namespace(listing):
    variables = entries_by_name(listing, namespace_prefix="lab-")["web2"]["vars"]
    assert variables["smallcloud_gateways"]["web"]["namespace"] == "lab-a1"


def test_a_network_record_without_cidr_or_vni_still_yields_its_gateway_host():
    listing = {"networks": {"odd": {"gateway_vtep": "192.0.2.9", "cidr": "not a cidr"}},
               "instances": {"a": {"interfaces": [{"network": "odd", "ip": "10.9.0.2", "mac": "02:00:00:00:00:01"}]}}}
    (entry,) = cloud.inventory_entries(listing)
    assert entry["name"] == "a"
    assert entry["vars"]["smallcloud_gateways"] == {"odd": {"vtep": "192.0.2.9", "namespace": None, "ip": None}}


def test_verify_file_takes_only_smallcloud_sources(tmp_path):
    plugin = cloud.InventoryModule()
    for name, wanted in (("cloud.smallcloud.yml", True), ("x.smallcloud.yaml", True), ("cloud.yml", False),
                         ("smallcloud.yml.bak", False)):
        (tmp_path / name).write_text("plugin: smallcloud.kvm.cloud\n")
        assert plugin.verify_file(str(tmp_path / name)) is wanted, name
    assert not plugin.verify_file(str(tmp_path / "absent.smallcloud.yml"))


# populate: Ansible's InventoryData, groups sanitized, constructed options --------------------------


OPTIONS = {
    "states": [], "networks": [], "hypervisors": [], "metadata": {}, "default_groups": True,
    "namespace_prefix": "scnet-", "gateway_proxy": False, "gateway_proxy_user": "root", "gateway_proxy_ssh_args": "",
    "strict": False, "compose": {}, "groups": {}, "keyed_groups": [], "use_extra_vars": False,
    "leading_separator": True, "cache": False,
}


def trusted(value):
    """``value`` with its strings trusted as templates, as parse() loads the source file."""
    if isinstance(value, dict):
        return {key: trusted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [trusted(item) for item in value]
    return trust_as_template(value) if isinstance(value, str) else value


def populated(listing, **options):
    plugin = cloud.InventoryModule()
    plugin._options = dict(OPTIONS, **trusted(options))
    plugin.inventory, plugin.loader, plugin._vars = InventoryData(), DataLoader(), {}
    plugin.populate(listing)
    return plugin.inventory


def members(inventory, group):
    return sorted(host.name for host in inventory.groups[group].get_hosts())


def test_populate_adds_hosts_vars_and_sanitized_default_groups(listing):
    inventory = populated(listing)
    assert sorted(inventory.hosts) == ["db1", "web1", "web2"]
    assert members(inventory, "smallcloud") == ["db1", "web1", "web2"]
    assert members(inventory, "network_web") == ["web1", "web2"]
    assert members(inventory, "hypervisor_hv_1_example") == ["web1"]
    assert members(inventory, "state_stopped") == ["web2"]
    assert members(inventory, "image_debian_12") == ["web1", "web2"]
    assert members(inventory, "image_https___example_org_tiny_qcow2") == ["db1"]
    assert inventory.get_host("web2").vars["ansible_host"] == "203.0.113.11"


def test_compose_groups_and_keyed_groups_see_the_host_vars(listing):
    inventory = populated(
        listing,
        compose={"ansible_user": "'debian'", "first_ip": "smallcloud_ips[0]"},
        groups={"exposed": "smallcloud_floating_ips | length > 0"},
        keyed_groups=[{"key": "smallcloud_hypervisor", "prefix": "on"}],
        default_groups=False,
    )
    assert "smallcloud" not in inventory.groups
    assert inventory.get_host("db1").vars["first_ip"] == "10.1.0.7"
    assert inventory.get_host("web1").vars["ansible_user"] == "debian"
    assert members(inventory, "exposed") == ["web1", "web2"]
    assert members(inventory, "on_hv_2") == ["db1", "web2"]


def test_strict_keyed_groups_over_a_missing_key_fail_naming_it(listing):
    keyed = [{"key": "smallcloud_metadata.owner", "prefix": "owner"}]
    assert "owner_" not in "".join(populated(listing, keyed_groups=keyed).groups)
    with pytest.raises(AnsibleParserError, match="smallcloud_metadata.owner"):
        populated(listing, keyed_groups=keyed, strict=True)


def test_strict_compose_error_names_the_variable(listing):
    with pytest.raises(AnsibleError, match="Could not set broken"):
        populated(listing, compose={"broken": "no_such_variable.x"}, strict=True)


def test_gateway_proxy_goes_through_the_gateway_namespace_only_without_floating_ip(listing):
    assert "ansible_ssh_common_args" not in populated(listing).get_host("db1").vars  # off by default
    inventory = populated(listing, gateway_proxy=True, gateway_proxy_ssh_args="-i /k -o StrictHostKeyChecking=no")
    assert inventory.get_host("db1").vars["ansible_ssh_common_args"] == (
        '-o ProxyCommand="ssh -i /k -o StrictHostKeyChecking=no -o BatchMode=yes root@192.0.2.2 '
        'ip netns exec scnet-b2 nc %h %p"')
    assert "ansible_ssh_common_args" not in inventory.get_host("web1").vars  # it has a floating IP
    other_user = populated(listing, gateway_proxy=True, gateway_proxy_user="ops")
    assert "ops@192.0.2.2 sudo -n ip netns exec" in other_user.get_host("db1").vars["ansible_ssh_common_args"]
    # compose still wins
    composed = populated(listing, gateway_proxy=True, compose={"ansible_ssh_common_args": "'-o X=y'"})
    assert composed.get_host("db1").vars["ansible_ssh_common_args"] == "-o X=y"


def test_metadata_is_a_host_var_and_keys_groups(listing):
    inventory = populated(listing, keyed_groups=[{"key": "smallcloud_metadata.role", "prefix": "role"}])
    assert inventory.get_host("web1").vars["smallcloud_metadata"] == {"role": "web", "environment": "prod"}
    assert inventory.get_host("db1").vars["smallcloud_metadata"] == {}
    assert members(inventory, "role_web") == ["web1", "web2"]


# errors ------------------------------------------------------------------------------------------


def etcd_plugin(**options):
    plugin = cloud.InventoryModule()
    plugin._options = {"etcd_endpoints": None, "etcd_client_config": "/nonexistent/etcd-client.json",
                       "etcd_prefix": "/smallcloud/v1", "etcd_ca_cert": None, "etcd_cert": None, "etcd_key": None,
                       "etcd_user": "admin", "etcd_password": "s3cret-pw", "etcd_timeout": 1, "etcd_lock_ttl": 60,
                       **options}
    return plugin


def test_unreachable_store_is_a_parser_error_naming_endpoint_and_prefix(monkeypatch):
    def unreachable(store):
        raise StoreUnreachable("no etcd endpoint answered (http://192.0.2.50:2379: refused)")

    monkeypatch.setattr(cloud, "read_records", unreachable)
    with pytest.raises(AnsibleParserError) as raised:
        etcd_plugin(etcd_endpoints=["http://192.0.2.50:2379"]).read_etcd()
    assert "etcd at http://192.0.2.50:2379 (etcd_prefix /smallcloud/v1)" in str(raised.value)
    assert "s3cret-pw" not in str(raised.value)


def test_without_endpoints_or_client_file_it_asks_loopback(monkeypatch):
    seen = {}
    monkeypatch.setattr(cloud, "read_records", lambda store: seen.setdefault("urls", store.gateway.endpoints))
    etcd_plugin().read_etcd()
    assert [getattr(url, "url", url) for url in seen["urls"]] == ["http://127.0.0.1:2379"]


def test_a_bad_client_file_is_a_parser_error_naming_it(tmp_path):
    bad = tmp_path / "etcd-client.json"
    bad.write_text("{not json")
    with pytest.raises(AnsibleParserError, match="etcd_client_config %s" % re.escape(str(bad))):
        etcd_plugin(etcd_client_config=str(bad)).read_etcd()
