"""The instance module boots the tiny guest under TCG: seeded hostname, DHCP lease from etcd, HTTP, ACPI stop.

The network is staged by hand the way smallcloud.kvm.network leaves it on its gateway host: a record in
etcd, bridge br-<vni hex>, namespace <prefix><vni hex> joined to the bridge by veth vg-<vni hex> <-> lan
holding the gateway address, and dnsmasq started with the network module's own config writer. The
instance module must hand dnsmasq the allocated lease (hosts file + SIGHUP), so the guest's
SMALLCLOUD-IP is the address recorded in etcd.
"""

import os
import random
import shutil
import subprocess
import tempfile
import uuid

import pytest
from tinyimage import HOSTNAME, IP, READY, Console

pytestmark = pytest.mark.e2e

CIDR = "10.214.0.0/24"
GATEWAY = "10.214.0.1"


def run(*argv, check=True):
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture
def staged_network(etcd, kvm_device):
    """Record, bridge, gateway namespace and dnsmasq of network 'lan'; all removed afterwards."""
    from ansible_collections.smallcloud.kvm.plugins.module_utils.core import files
    from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
    from ansible_collections.smallcloud.kvm.plugins.module_utils.network.networks import device_names
    from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store
    import ipaddress

    work = tempfile.mkdtemp(prefix="sct-boot-", dir="/var/tmp")
    os.chmod(work, 0o755)
    vni = random.randint(0xF00000, 0xFFFFFF)
    prefix = "sct%s-" % uuid.uuid4().hex[:6]
    names = device_names(vni, prefix)
    state_root = os.path.join(work, "networks")
    state_dir = os.path.join(state_root, names["namespace"])
    try:
        run("ip", "link", "add", names["bridge"], "type", "bridge")
        run("ip", "link", "set", names["bridge"], "up")
        svc.netns_add(names["namespace"])
        run("ip", "link", "add", names["lan_host"], "type", "veth", "peer", "name", "lan", "netns", names["namespace"])
        run("ip", "link", "set", names["lan_host"], "master", names["bridge"], "up")
        run("ip", "-n", names["namespace"], "addr", "add", GATEWAY + "/24", "dev", "lan")
        run("ip", "-n", names["namespace"], "link", "set", "lan", "up")
        files.write_text(os.path.join(state_dir, "dnsmasq.conf"), svc.dnsmasq_conf(
            state_dir, "lan", ipaddress.ip_network(CIDR), gateway_ip=GATEWAY, mtu=1450, dns_servers=[]))
        files.write_text(os.path.join(state_dir, "hosts"), "")
        svc.dnsmasq_start(names["namespace"], state_dir)
        Store.from_params(etcd.module_args).put("networks/lan", {
            "name": "lan", "cidr": CIDR, "vni": vni, "mtu": 1450, "dhcp": True, "dns_servers": [], "nat": False,
            "vteps": [], "gateway_vtep": None})
        yield {"work": work, "prefix": prefix, "state_root": state_root, "names": names, "state_dir": state_dir}
    finally:
        svc.dnsmasq_stop(state_dir)
        svc.netns_delete(names["namespace"])
        run("ip", "link", "del", names["bridge"], check=False)
        shutil.rmtree(work, ignore_errors=True)


def domstate(name):
    """The domain's state as virsh reports it ('running', 'shut off', ...)."""
    return run("virsh", "domstate", name, check=False).stdout.strip()


def http_get(namespace, address):
    """What the guest's HTTP server answers, fetched from inside the gateway namespace ('' if nothing)."""
    # No -T: this busybox's wget crashes with it; the subprocess timeout bounds the wait instead.
    result = subprocess.run(["ip", "netns", "exec", namespace, "busybox", "wget", "-q", "-O", "-",
                             "http://%s/" % address], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.strip()


def test_tiny_guest_boots_with_its_seeded_hostname_and_the_recorded_lease(
        tiny_image, staged_network, etcd, ansible):
    name = "sct-%s" % uuid.uuid4().hex[:8]
    hostname = "seeded-%s" % name[4:]
    instances_dir = os.path.join(staged_network["work"], "instances")
    cache_dir = os.path.join(staged_network["work"], "cache")
    args = dict(etcd.module_args, name=name, image=str(tiny_image.qcow2), memory=128, hostname=hostname,
                networks=["lan"], instances_dir=instances_dir, image_cache_dir=cache_dir,
                network_state_dir=staged_network["state_root"], namespace_prefix=staged_network["prefix"],
                user_data="#cloud-config\nfinal_message: smallcloud\n", shutdown_timeout=60)
    try:
        created = ansible.run_module("instance", args)
        assert created["changed"] is True and not created.get("failed"), created.get("msg")
        [address] = created["ips"]
        hosts = open(os.path.join(staged_network["state_dir"], "hosts")).read()
        assert "%s,%s" % (created["macs"][0], address) in hosts

        console = Console(created["console_log"], alive=lambda: domstate(name) == "running")
        ready = console.wait_for(READY)
        assert ready == "%s %s" % (READY, hostname)
        assert console.lines(HOSTNAME) == ["%s %s" % (HOSTNAME, hostname)]
        assert console.lines(IP) == ["%s eth0 %s" % (IP, address)]
        assert http_get(staged_network["names"]["namespace"], address) == hostname

        assert ansible.run_module("instance", args)["changed"] is False

        stopped = ansible.run_module("instance", dict(args, state="stopped"))
        assert stopped["changed"] is True and run("virsh", "domstate", name).stdout.strip() == "shut off"
        # The ACPI button powered the guest off (a forced stop would read "destroyed").
        assert "shutdown" in run("virsh", "domstate", "--reason", name).stdout
    finally:
        gone = ansible.run_module("instance", dict(args, state="absent", shutdown_timeout=0))
        assert not gone.get("failed"), gone.get("msg")
    assert run("virsh", "domstate", name, check=False).returncode != 0
    assert not os.path.exists(os.path.join(instances_dir, name))
    assert "," + address not in open(os.path.join(staged_network["state_dir"], "hosts")).read()
