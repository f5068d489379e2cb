"""The smallcloud.kvm.cloud role through ansible-playbook: converge declared data, then `cloud_prune`
removes what is recorded but no longer declared (instance, network, floating IP) and leaves what is
still declared untouched: same domain, same MAC and IP, same VNI, same floating address.

The role's per-resource tags (`--tags cloud_networks`, ...) converge only that resource.

Networks are made in this host's own namespace, as on a hypervisor (the demo does the same); the
guests boot no OS. Teardown at the end must leave no record, domain, namespace or link.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import pytest
from harness.host import cloud_traces, virsh
from harness.netns import netns_list

pytestmark = pytest.mark.integration

POOL = "198.18.30.0/24"
KEEP_NET = {"name": "prn-keep", "cidr": "10.126.0.0/24", "nat": True, "egress_pool": POOL}
DROP_NET = {"name": "prn-drop", "cidr": "10.126.1.0/24"}
TAG_NET = {"name": "tag-net", "cidr": "10.127.0.0/24"}
# The domains these tests may make, which the fixture must find gone at the end.
DOMAIN_PREFIXES = ("prn-", "tag-")
ROLE_PLAY = [{"name": "cloud", "hosts": "localhost", "gather_facts": False, "roles": ["smallcloud.kvm.cloud"]}]


def default_route_interface():
    routes = subprocess.run(["ip", "-json", "route", "show", "default"], capture_output=True, text=True, check=True)
    return json.loads(routes.stdout)[0]["dev"]


class World:
    """A served base image, scratch cache and instance dirs, and the role's variables for a declaration."""

    def __init__(self, etcd, server, work):
        self.etcd, self.work = etcd, work
        base = os.path.join(work, "served", "base.qcow2")
        digest = hashlib.sha256(open(base, "rb").read()).hexdigest()
        self.image = {"url": server.url("base.qcow2"), "checksum": "sha256:" + digest}
        self.play = os.path.join(work, "cloud.yml")
        with open(self.play, "w") as handle:
            json.dump(ROLE_PLAY, handle)

    def instance(self, name, network):
        return {"name": name, "image": self.image["url"], "image_checksum": self.image["checksum"], "memory": 64,
                "networks": [network]}

    def declared(self, networks, instances, floating, **extra):
        return {
            "cloud_etcd_endpoints": self.etcd.endpoints, "cloud_etcd_prefix": self.etcd.prefix,
            "cloud_image_cache_dir": os.path.join(self.work, "cache"),
            "cloud_instances_dir": os.path.join(self.work, "instances"),
            "cloud_shutdown_timeout": 2,  # the guests boot no OS, so ACPI never stops them
            "cloud_images": [self.image], "cloud_networks": networks,
            # What the hypervisor role would set: the default route's interface.
            "cloud_underlay_interface": default_route_interface(),
            "cloud_instances": [self.instance(name, network) for name, network in instances],
            "cloud_floating_ips": [{"network": network, "instance": name, "pool": POOL} for name, network in floating],
            **extra,
        }

    def records(self):
        """Every key under the test's etcd prefix with its value, as text (allocations included)."""
        from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

        store = Store.from_params(self.etcd.module_args)
        folders = ("networks", "instances", "floating_ips", "floating", "vni", "mac", "ipam")
        return {folder: store.list(folder) for folder in folders}


@pytest.fixture
def world(etcd, kvm_device, http_server, ansible):
    work = tempfile.mkdtemp(prefix="sct-cloud-role-", dir="/var/tmp")
    os.chmod(work, 0o755)  # libvirt's QEMU user reaches the disks below it
    os.mkdir(os.path.join(work, "served"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(work, "served", "base.qcow2"), "64M"],
                   check=True)
    before = cloud_traces(DOMAIN_PREFIXES, processes=[("dnsmasq", "smallcloud")], files=[])
    world = World(etcd, http_server(os.path.join(work, "served")), work)
    yield world
    teardown = ansible.run_playbook("smallcloud.kvm.teardown", extra_vars={
        **world.declared([], [], []), "smallcloud_hypervisor_hosts": "localhost"})
    for name in virsh("list", "--all", "--name").stdout.split():
        if name.startswith(DOMAIN_PREFIXES):  # only when teardown failed: never leave a domain behind
            virsh("destroy", name)
            virsh("undefine", name, "--nvram")
    shutil.rmtree(work, ignore_errors=True)
    assert teardown.rc == 0 and teardown.failed_count() == 0, teardown.stdout[-3000:]
    assert cloud_traces(DOMAIN_PREFIXES, processes=[("dnsmasq", "smallcloud")], files=[]) == before


def converge(ansible, world, variables, check=False, playbook=None, args=()):
    run = ansible.run_playbook(playbook or world.play, extra_vars=variables, check=check, args=args)
    failed = run.failures()
    assert run.rc == 0 and not failed, failed or run.stderr[-3000:]
    return run


def domain_uuid(name):
    result = virsh("domuuid", name)
    return result.stdout.strip() if result.returncode == 0 else None


def mentions(records, text):
    """The keys of ``records`` whose key or value mentions ``text``."""
    return sorted("%s/%s" % (folder, key) for folder, listing in records.items()
                  for key, value in listing.items() if text in key or text in json.dumps(value))


def test_prune_removes_only_what_is_no_longer_declared(ansible, world):
    everything = world.declared(
        [KEEP_NET, DROP_NET],
        [("prn-keep-vm", "prn-keep"), ("prn-drop-vm", "prn-drop"), ("prn-drop-fip", "prn-keep")],
        [("prn-keep-vm", "prn-keep"), ("prn-drop-fip", "prn-keep")])
    converge(ansible, world, everything)
    first = world.records()
    assert sorted(first["instances"]) == ["prn-drop-fip", "prn-drop-vm", "prn-keep-vm"]
    floating = {record["instance"]: address for address, record in first["floating_ips"].items()}
    keep_uuid = domain_uuid("prn-keep-vm")
    drop_vni = first["networks"]["prn-drop"]["vni"]
    drop_namespace = "scnet-%x" % drop_vni
    assert drop_namespace in netns_list()

    kept = world.declared([KEEP_NET], [("prn-keep-vm", "prn-keep")], [("prn-keep-vm", "prn-keep")],
                          cloud_prune=True)
    preview = converge(ansible, world, kept, check=True)
    assert preview.changed_count() > 0
    assert world.records() == first and domain_uuid("prn-drop-vm") and drop_namespace in netns_list()

    pruned = converge(ansible, world, kept)
    assert pruned.changed_count() > 0
    after = world.records()
    # What is still declared is untouched.
    assert list(after["instances"]) == ["prn-keep-vm"]
    assert after["instances"]["prn-keep-vm"]["interfaces"] == first["instances"]["prn-keep-vm"]["interfaces"]
    assert domain_uuid("prn-keep-vm") == keep_uuid
    assert virsh("domstate", "prn-keep-vm").stdout.strip() == "running"
    assert list(after["networks"]) == ["prn-keep"] and after["networks"]["prn-keep"] == first["networks"]["prn-keep"]
    assert list(after["floating_ips"]) == [floating["prn-keep-vm"]]
    # What is not is gone: domains, disks, records, allocations, the network's namespace and links.
    assert domain_uuid("prn-drop-vm") is None and domain_uuid("prn-drop-fip") is None
    assert sorted(os.listdir(os.path.join(world.work, "instances"))) == ["prn-keep-vm"]
    assert mentions(after, "prn-drop") == []
    assert mentions(after, floating["prn-drop-fip"]) == []
    assert str(drop_vni) not in after["vni"] and drop_namespace not in netns_list()
    assert not [link for link in cloud_traces("prn-", [], [])["links"] if link.endswith("-%x" % drop_vni)]

    again = converge(ansible, world, kept)
    assert again.changed_count() == 0


def test_a_resource_tag_converges_only_that_resource(ansible, world):
    declared = world.declared([TAG_NET], [("tag-vm", "tag-net")], [("tag-vm", "tag-net")],
                              smallcloud_hypervisor_hosts="localhost")
    run = converge(ansible, world, declared, playbook="smallcloud.kvm.converge", args=["--tags", "cloud_networks"])
    records = world.records()
    # The network converged: its record, and its gateway namespace and bridge on this host.
    assert list(records["networks"]) == ["tag-net"]
    vni = records["networks"]["tag-net"]["vni"]
    assert "scnet-%x" % vni in netns_list() and "br-%x" % vni in cloud_traces("tag-", [], [])["links"]
    # Nothing else did: no instance, domain, floating IP or cached image.
    assert records["instances"] == {} and domain_uuid("tag-vm") is None
    assert records["floating_ips"] == {} and records["floating"] == {}
    cache = os.path.join(world.work, "cache")
    assert not os.path.exists(cache) or os.listdir(cache) == []
    # The preflight ran too.
    assert "smallcloud.kvm.cloud : Check the role's variables" in [task["task"]["name"] for task in run.tasks]
