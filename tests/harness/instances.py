"""An instance's world on this host for the integration tier: a scratch directory with a small base image, a
bridge standing for a network's bridge, and that network's record in the test's etcd prefix."""

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import uuid

NETWORK = "lan"
CIDR = "10.213.0.0/24"
BASE_SIZE = 64 * 1024 * 1024


def virsh(*args, check=False):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=check,
                          timeout=120)


def domain_state(name):
    """'running', 'shut off', ... or None when the domain is not defined."""
    result = virsh("domstate", name)
    return result.stdout.strip() if result.returncode == 0 else None


def store_for(etcd):
    from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

    return Store.from_params(etcd.module_args)


class Cloud:
    """What the tests need to drive the module: args, names, store."""

    def __init__(self, etcd, work, base, bridge, prefix, store):
        self.etcd, self.work, self.base, self.bridge, self.prefix, self.store = etcd, work, base, bridge, prefix, store
        self.instances_dir = os.path.join(work, "instances")

    def name(self, suffix="a"):
        return "%s-%s" % (self.prefix, suffix)

    def args(self, **extra):
        args = dict(self.etcd.module_args, image=self.base, memory=64, instances_dir=self.instances_dir,
                    image_cache_dir=os.path.join(self.work, "cache"), shutdown_timeout=1, networks=[NETWORK])
        args.update(extra)
        return args

    def leftovers(self, name):
        """Everything of ``name`` still present: domain, files, etcd record and allocations."""
        found = []
        if domain_state(name) is not None:
            found.append("domain")
        if os.path.exists(os.path.join(self.instances_dir, name)):
            found.append("files")
        if self.store.get("instances/%s" % name) is not None:
            found.append("record")
        owner = "instance/%s" % name
        for folder in ("mac", "ipam/%s" % NETWORK):
            found += ["%s/%s" % (folder, key) for key, value in self.store.list(folder).items()
                      if value.get("owner") == owner]
        return found


@contextlib.contextmanager
def instance_world(etcd):
    """Scratch dir with a base image, a bridge, a network record: a ``Cloud``; everything removed afterwards."""
    work = tempfile.mkdtemp(prefix="sct-inst-", dir="/var/tmp")
    os.chmod(work, 0o755)
    base = os.path.join(work, "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(BASE_SIZE)], check=True)
    vni = random.randint(0xF00000, 0xFFFFFF)
    bridge = "br-%x" % vni
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    store = store_for(etcd)
    store.put("networks/%s" % NETWORK, {"name": NETWORK, "cidr": CIDR, "vni": vni, "mtu": 1450, "dhcp": True,
                                        "dns_servers": [], "nat": False, "vteps": [], "gateway_vtep": None})
    prefix = "sct-%s" % uuid.uuid4().hex[:8]
    env = Cloud(etcd, work, base, bridge, prefix, store)
    try:
        yield env
    finally:
        remove_world(env)


def remove_world(env):
    """Domains named with the world's prefix, the bridge, the files, the guest filter."""
    prefix, bridge, work = env.prefix, env.bridge, env.work
    for name in virsh("list", "--all", "--name").stdout.split():
        if name.startswith(prefix):
            virsh("destroy", name)
            virsh("undefine", name, "--managed-save", "--snapshots-metadata", "--nvram")
    subprocess.run(["ip", "link", "del", bridge], check=False)
    shutil.rmtree(work, ignore_errors=True)
    # Written by the instance module for this host's guests (network.guest_filter); gone with the last guest
    # the module removes, but not with guests a test removed behind its back.
    subprocess.run(["nft", "delete", "table", "inet", "smallcloud_guests"], check=False, capture_output=True)
