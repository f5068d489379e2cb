"""The inventory plugin smallcloud.kvm.cloud read by ansible-inventory from a real etcd.

Records are written with the Store API under the test's private prefix (the ``etcd`` fixture removes them);
ansible-inventory runs as a user runs it, on a ``*.smallcloud.yml`` source file.
"""

import json
import subprocess

import pytest
import yaml
from harness.ansible import VENV_BIN, ansible_env
from harness.ports import free_port

from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

pytestmark = pytest.mark.integration

NETWORKS = {
    "web": {"name": "web", "cidr": "10.20.0.0/24", "vni": 0x51, "mtu": 1450, "gateway_vtep": "127.0.0.1"},
    "db": {"name": "db", "cidr": "10.21.0.0/24", "vni": 0x52, "mtu": 1450, "gateway_vtep": "127.0.0.2"},
}
INSTANCES = {
    "web1": {"name": "web1", "uuid": "11111111-0000-4000-8000-000000000001", "host": "hv-a", "state": "running",
             "image": "debian:12", "interfaces": [{"network": "web", "mac": "02:73:63:00:10:01", "ip": "10.20.0.5"}]},
    "web2": {"name": "web2", "uuid": "11111111-0000-4000-8000-000000000002", "host": "hv-b", "state": "stopped",
             "image": "debian:12", "interfaces": [{"network": "web", "mac": "02:73:63:00:10:02", "ip": "10.20.0.6"},
                                                  {"network": "db", "mac": "02:73:63:00:10:03", "ip": "10.21.0.6"}]},
    "db1": {"name": "db1", "uuid": "11111111-0000-4000-8000-000000000003", "host": "hv-b", "state": "running",
            "image": "tiny", "interfaces": [{"network": "db", "mac": "02:73:63:00:10:04", "ip": "10.21.0.7"}]},
}
FLOATING = {"address": "198.51.100.10", "pool": "198.51.100.0/24", "network": "web", "instance": "web1",
            "fixed_ip": "10.20.0.5"}


@pytest.fixture
def cloud(etcd):
    """Three instances, two networks and a floating IP under the test's prefix."""
    store = Store.from_params(etcd.module_args)
    for name, record in NETWORKS.items():
        store.put(records.network_key(name), record)
    for name, record in INSTANCES.items():
        store.put(records.instance_key(name), record)
    store.put(records.floating_ip_key(FLOATING["address"]), FLOATING)
    yield store
    assert store.delete_prefix(records.INSTANCES) >= 0  # the fixture removes the rest with the prefix


def source(tmp_path, etcd, name="cloud.smallcloud.yml", **options):
    """An inventory source file for the test's etcd prefix."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"plugin": "smallcloud.kvm.cloud", **etcd.module_args, **options}))
    return path


def inventory(path, *args, env=None):
    """``ansible-inventory -i path --list ...``: the CompletedProcess."""
    argv = [str(VENV_BIN / "ansible-inventory"), "-i", str(path), *args]
    if "--graph" not in args:
        argv.append("--list")
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120,
                          env=ansible_env({"ANSIBLE_INVENTORY_UNPARSED_FAILED": "1", **(env or {})}))


def plain(value):
    """A JSON object of ``--list`` without its wrapper: values read from etcd are data, listed as unsafe."""
    return value["__ansible_unsafe"] if set(value) == {"__ansible_unsafe"} else value


def listed(path, *args):
    result = inventory(path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout, object_hook=plain)


def hosts_of(data, group):
    return sorted(data.get(group, {}).get("hosts", []))


def test_hosts_vars_default_groups_and_constructed_options(cloud, etcd, tmp_path):
    data = listed(source(
        tmp_path, etcd, strict=True,
        compose={"ansible_user": "'debian'", "gateway_host": "smallcloud_gateways[smallcloud_networks[0]].vtep"},
        keyed_groups=[{"key": "smallcloud_hypervisor", "prefix": "on"}],
        groups={"exposed": "smallcloud_floating_ips | length > 0"},
    ))
    hostvars = data["_meta"]["hostvars"]
    assert sorted(hostvars) == ["db1", "web1", "web2"]
    web2 = hostvars["web2"]
    assert web2["smallcloud_uuid"] == INSTANCES["web2"]["uuid"]
    assert web2["smallcloud_hypervisor"] == "hv-b" and web2["smallcloud_state"] == "stopped"
    assert web2["smallcloud_networks"] == ["web", "db"]
    assert web2["smallcloud_interfaces"] == [{"network": "web", "ip": "10.20.0.6", "mac": "02:73:63:00:10:02"},
                                             {"network": "db", "ip": "10.21.0.6", "mac": "02:73:63:00:10:03"}]
    assert web2["smallcloud_ips"] == ["10.20.0.6", "10.21.0.6"]
    assert web2["smallcloud_macs"] == ["02:73:63:00:10:02", "02:73:63:00:10:03"]
    assert web2["smallcloud_image"] == "debian:12" and web2["smallcloud_floating_ips"] == []
    assert web2["smallcloud_gateways"]["db"] == {"vtep": "127.0.0.2", "namespace": "scnet-52", "ip": "10.21.0.1"}
    # ansible_host: the floating IP where there is one, else the first fixed IP
    assert hostvars["web1"]["ansible_host"] == "198.51.100.10"
    assert hostvars["web1"]["smallcloud_floating_ips"] == ["198.51.100.10"]
    assert web2["ansible_host"] == "10.20.0.6" and hostvars["db1"]["ansible_host"] == "10.21.0.7"
    # compose
    assert {host["ansible_user"] for host in hostvars.values()} == {"debian"}
    assert hostvars["db1"]["gateway_host"] == "127.0.0.2"
    # default groups, sanitized the Ansible way
    assert hosts_of(data, "smallcloud") == ["db1", "web1", "web2"]
    assert hosts_of(data, "network_web") == ["web1", "web2"] and hosts_of(data, "network_db") == ["db1", "web2"]
    assert hosts_of(data, "hypervisor_hv_b") == ["db1", "web2"] and hosts_of(data, "hypervisor_hv_a") == ["web1"]
    assert hosts_of(data, "state_running") == ["db1", "web1"] and hosts_of(data, "state_stopped") == ["web2"]
    assert hosts_of(data, "image_debian_12") == ["web1", "web2"] and hosts_of(data, "image_tiny") == ["db1"]
    # keyed_groups and groups
    assert hosts_of(data, "on_hv_b") == ["db1", "web2"]
    assert hosts_of(data, "exposed") == ["web1"]


def test_graph_and_filters(cloud, etcd, tmp_path):
    path = source(tmp_path, etcd, states=["running"], networks=["db"], default_groups=False,
                  keyed_groups=[{"key": "smallcloud_state", "prefix": "is"}])
    data = listed(path)
    assert sorted(data["_meta"]["hostvars"]) == ["db1"]
    assert "smallcloud" not in data and hosts_of(data, "is_running") == ["db1"]
    graph = inventory(path, "--graph")
    assert graph.returncode == 0, graph.stderr
    assert "@is_running:" in graph.stdout and "db1" in graph.stdout and "web1" not in graph.stdout
    data = listed(source(tmp_path, etcd, name="hv.smallcloud.yaml", hypervisors=["hv-a", "nowhere"]))
    assert sorted(data["_meta"]["hostvars"]) == ["web1"]


def test_cache_is_read_until_flushed(cloud, etcd, tmp_path):
    path = source(tmp_path, etcd, cache=True, cache_plugin="ansible.builtin.jsonfile",
                  cache_connection=str(tmp_path / "cache"), cache_timeout=3600)
    assert sorted(listed(path)["_meta"]["hostvars"]) == ["db1", "web1", "web2"]
    cached = [file.read_text() for file in (tmp_path / "cache").iterdir()]
    assert len(cached) == 1 and "web1" in cached[0] and "etcd" not in cached[0]  # records only, no options
    assert cloud.delete(records.instance_key("db1"))
    assert sorted(listed(path)["_meta"]["hostvars"]) == ["db1", "web1", "web2"]  # from the cache
    assert sorted(listed(path, "--flush-cache")["_meta"]["hostvars"]) == ["web1", "web2"]
    assert sorted(listed(path)["_meta"]["hostvars"]) == ["web1", "web2"]  # the cache was refreshed


def test_unreachable_endpoint_is_a_clear_error_naming_it(etcd, tmp_path):
    endpoint = "http://127.0.0.1:%d" % free_port()
    path = source(tmp_path, etcd, etcd_endpoints=[endpoint], etcd_timeout=2, etcd_user="admin",
                  etcd_password="never-print-me")
    result = inventory(path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "smallcloud.kvm.cloud: cannot read the cloud's records from etcd at %s" % endpoint in output, output
    assert "never-print-me" not in output


def test_an_unknown_option_is_refused_naming_it(etcd, tmp_path):
    result = inventory(source(tmp_path, etcd, bogus=1))
    assert result.returncode != 0
    assert "bogus" in result.stdout + result.stderr
