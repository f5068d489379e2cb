"""Real guests (issue 13): the Debian cloud image, booted by the public playbooks on two lab hosts, read by real
cloud-init, and configured over SSH by a play whose inventory is the smallcloud.kvm.cloud plugin.

One lab of two hosts, one deploy and one boot of two Debian guests serve every assertion:

- ``rg-cloud`` on h1, the network's gateway host: Debian's cloud kernel (no SATA driver), no floating IP, so
  the controller reaches it through the inventory plugin's gateway proxy (SSH to h1, ``nc`` from the
  gateway namespace);
- ``rg-generic`` on h2: Debian's generic kernel, a floating IP the controller reaches directly.

The converge waits with ``cloud_wait_for: ssh`` (the instance module's ``wait_for``), so the very next play
logs in as the image's default user with the key the seed carried.
"""

import json
import subprocess
import sys
from base64 import b64decode
from pathlib import Path

import pytest
from harness.ansible import ansible_env, run_playbook, task_name
from harness.netns import netns_list
from labcloud import LabCloud
from test_lab import lab, machine_traces

pytestmark = pytest.mark.e2e

HOSTS = {"h1": "10.250.0.11", "h2": "10.250.0.12"}  # the lab's first two
UNDERLAY_HOST, OUTSIDE_NS, HTTP_PORT = "10.250.0.1", "sclab-outside", 8098
POOL = "198.18.71.0/24"
USER_DATA = """#cloud-config
write_files:
  - path: /etc/smallcloud-test/hello
    content: hello from user-data
runcmd:
  - [sh, -c, "hostname > /var/tmp/runcmd-ran"]
"""
# What the guests' play reports, one task each (the names are how the test finds their results).
PLAY = [{
    "name": "Configure the cloud's guests", "hosts": "smallcloud", "gather_facts": True,
    "vars": {"peer": "{{ 'generic-one' if inventory_hostname == 'rg-cloud' else 'rg-cloud' }}"},
    "tasks": [
        {"name": "cloud-init status", "ansible.builtin.command": "cloud-init status --long --wait",
         "changed_when": False, "failed_when": False},
        {"name": "cloud-init result", "ansible.builtin.slurp": {"src": "/run/cloud-init/result.json"}},
        {"name": "cloud-init warnings", "become": True, "changed_when": False, "failed_when": False,
         "ansible.builtin.command": "grep -E 'WARNING|ERROR|Traceback' /var/log/cloud-init.log"},
        {"name": "sudo", "ansible.builtin.command": "sudo -n true", "changed_when": False},
        {"name": "fqdn", "ansible.builtin.command": "hostname -f", "changed_when": False},
        {"name": "peer by name", "ansible.builtin.command": "getent hosts {{ peer }}", "changed_when": False},
        {"name": "user-data file", "ansible.builtin.slurp": {"src": "/etc/smallcloud-test/hello"}},
        {"name": "user-data runcmd", "ansible.builtin.slurp": {"src": "/var/tmp/runcmd-ran"}},
        {"name": "write a file", "ansible.builtin.copy": {
            "content": "configured by ansible as {{ inventory_hostname }}\n", "dest": "/home/debian/configured"}},
        {"name": "read it back", "ansible.builtin.command": "cat /home/debian/configured", "changed_when": False},
    ],
}]


class RealGuests(LabCloud):
    """The lab cloud of two Debian guests."""

    def __init__(self, directory, image, guest_key):
        super().__init__(directory)
        sums = image.checksums()
        self.public_key = Path(str(guest_key) + ".pub").read_text().strip()

        def debian(name, host, kernel, hostname):
            file = image.name(kernel)
            return {"name": name, "host": host, "image": "http://%s:%d/%s" % (UNDERLAY_HOST, HTTP_PORT, file),
                    "image_checksum": "sha256:" + sums[file], "memory": 512, "cpus": 1, "networks": ["rg-net"],
                    "ssh_keys": [self.public_key], "hostname": hostname, "user_data": USER_DATA,
                    "metadata": {"role": "web", "kernel": kernel}, "security_groups": ["rg-ssh"]}

        self.data = {
            "cloud_networks": [{"name": "rg-net", "cidr": "10.71.0.0/24", "nat": True, "egress_pool": POOL,
                                "gateway_host": "h1"}],
            "cloud_instances": [debian("rg-cloud", "h1", "cloud", "rg-cloud"),
                                debian("rg-generic", "h2", "generic", "generic-one")],
            "cloud_floating_ips": [{"network": "rg-net", "instance": "rg-generic", "pool": POOL}],
            # Ansible logs in over SSH: on the floating IP from outside the network, so the group opens port 22.
            "cloud_security_groups": [{"name": "rg-ssh", "rules": [{"protocol": "tcp", "port": 22}]}],
            "cloud_wait_for": "ssh",
            "cloud_wait_timeout": 900,
        }

    def inventory_source(self, guest_key, **options):
        """An inventory source of the plugin, with h1's etcd client settings and the gateway proxy."""
        _store, client = self.store()
        source = {
            "plugin": "smallcloud.kvm.cloud",
            "etcd_endpoints": client["endpoints"],
            **{option: str(self.host_path("h1", client[key])) for option, key in (
                ("etcd_ca_cert", "ca_cert"), ("etcd_cert", "cert"), ("etcd_key", "key"))},
            "metadata": {"role": "web"},
            "gateway_proxy": True,
            "gateway_proxy_ssh_args": "-i %s -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                      "-o LogLevel=ERROR" % (self.dir / "id_ed25519"),
            "keyed_groups": [{"key": "smallcloud_metadata.kernel", "prefix": "kernel"}],
            "compose": {"ansible_user": "'debian'", "ansible_ssh_private_key_file": "'%s'" % guest_key,
                        "ansible_ssh_extra_args": "'-o UserKnownHostsFile=/dev/null'",
                        "ansible_python_interpreter": "'/usr/bin/python3'"},
            **options,
        }
        path = self.dir / "guests.smallcloud.yml"
        path.write_text(json.dumps(source))
        return path


def host_result(run, task, host):
    """The result of ``task`` (by name, without a role's prefix) on ``host`` in a PlaybookRun."""
    return next(t["hosts"][host] for t in run.tasks if task_name(t) == task and host in t["hosts"])


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, debian_image):
    """A 2-host lab with the Debian images served on the underlay; down to nothing afterwards."""
    before = machine_traces()
    top = tmp_path_factory.mktemp("real-guests")
    guest_key = top / "guest_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rg-test", "-f", str(guest_key)],
                   check=True)
    directory = top / "lab"
    up = lab("up", "--hosts", "2", directory=directory)
    server = None
    try:
        assert up.returncode == 0, up.stderr
        server = subprocess.Popen(  # noqa: S603 - argv list
            [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", UNDERLAY_HOST, "--directory",
             str(debian_image.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The floating pool is routed to the gateway host: by the uplink (for the other host) and by this
        # machine, the controller. The route goes with the lab's bridge.
        subprocess.run(["ip", "-n", OUTSIDE_NS, "route", "add", POOL, "via", HOSTS["h1"]], check=True)
        subprocess.run(["ip", "route", "add", POOL, "via", HOSTS["h1"]], check=True)
        yield RealGuests(directory, debian_image, guest_key), guest_key
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "route", "del", POOL], capture_output=True, check=False)
        down = lab("down", directory=directory)
    assert down.returncode == 0, down.stderr
    assert machine_traces() == before and not [ns for ns in netns_list() if ns.startswith("scnet-")]


def test_real_cloud_init_guests_on_two_hosts_configured_through_the_inventory_plugin(cloud, ansible):
    cloud, guest_key = cloud
    deploy = cloud.playbook(ansible, "deploy")
    assert deploy.rc == 0 and deploy.failures() == [], (deploy.failures(), deploy.stderr[-2000:])

    # converge ends once both guests answer SSH: one probed from h1's gateway namespace, one on its floating IP.
    converge = cloud.playbook(ansible, "converge")
    assert converge.rc == 0 and converge.failures() == [], (converge.failures(), converge.stderr[-3000:])
    waited = {host: host_result(converge, "Wait until the instances of this host answer SSH", host)
              for host in HOSTS}
    assert {host: [i["name"] for i in result["instances"] if "ssh_after" in i] for host, result in waited.items()} \
        == {"h1": ["rg-cloud"], "h2": ["rg-generic"]}, waited
    store, _client = cloud.store()
    records = {name: store.get("instances/" + name) for name in ("rg-cloud", "rg-generic")}
    assert {name: r["metadata"] for name, r in records.items()} == {
        "rg-cloud": {"role": "web", "kernel": "cloud"}, "rg-generic": {"role": "web", "kernel": "generic"}}
    network = store.get("networks/rg-net")

    # The inventory plugin: both guests, grouped by network, hypervisor and the metadata's kernel.
    source = cloud.inventory_source(guest_key)
    graph = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(source), "--graph"],
                           capture_output=True, text=True, env=ansible_env(), timeout=120, check=False)
    assert graph.returncode == 0, graph.stderr
    for line in ("@kernel_cloud:", "@kernel_generic:", "@network_rg_net:", "@hypervisor_h1:", "|--rg-cloud",
                 "|--rg-generic"):
        assert line in graph.stdout, graph.stdout

    # A play through the plugin gathers facts and writes a file on both guests, over SSH as the default user.
    play = cloud.dir / "guests.yml"
    play.write_text(json.dumps(PLAY))
    guests = run_playbook(play, inventory=source, timeout=900)
    assert guests.rc == 0 and guests.failures() == [], (guests.failures(), guests.stderr[-3000:])
    expected = {"rg-cloud": ("h1", "rg-cloud", "cloud-amd64"), "rg-generic": ("h2", "generic-one", None)}
    for name, (host, hostname, kernel_mark) in expected.items():
        facts = host_result(guests, "Gathering Facts", name)["ansible_facts"]
        status = host_result(guests, "cloud-init status", name)
        assert status["rc"] == 0 and "status: done" in status["stdout"], (name, status)
        result = json.loads(b64decode(host_result(guests, "cloud-init result", name)["content"]))
        assert result["v1"]["errors"] == [] and "NoCloud" in result["v1"]["datasource"], (name, result)
        assert host_result(guests, "cloud-init warnings", name)["stdout"] == "", name
        assert host_result(guests, "sudo", name)["stderr"] == "", name  # its own name resolves
        assert facts["ansible_hostname"] == hostname and host_result(guests, "fqdn", name)["stdout"] == hostname
        assert facts["ansible_user_id"] == "debian"
        # Debian's cloud kernel found the seed too: it has no SATA driver.
        kernel = facts["ansible_kernel"]
        assert (kernel_mark in kernel) if kernel_mark else ("cloud" not in kernel), (name, kernel)
        # The address it configured is the one etcd allocated, with the network's MTU.
        assert facts["ansible_default_ipv4"]["address"] == records[name]["interfaces"][0]["ip"]
        assert facts["ansible_default_ipv4"]["mtu"] == network["mtu"]
        # user-data: write_files and runcmd took effect; the play's own file is there.
        assert b64decode(host_result(guests, "user-data file", name)["content"]).decode() == "hello from user-data"
        assert b64decode(host_result(guests, "user-data runcmd", name)["content"]).decode().strip() == hostname
        assert host_result(guests, "read it back", name)["stdout"] == "configured by ansible as %s" % name
        # The peer's name resolves through the gateway's DNS to the address etcd gave it.
        peer = "rg-generic" if name == "rg-cloud" else "rg-cloud"
        assert host_result(guests, "peer by name", name)["stdout"].split()[0] == \
            records[peer]["interfaces"][0]["ip"]
        # The console log the module returned holds the boot, cloud-init's last word included.
        console = cloud.host_path(host, records[name]["console_log"]).read_text(errors="replace")
        assert "Linux version" in console and "Cloud-init v." in console and "finished at" in console, name

    # Again: nothing to change, on the cloud or in the guests.
    again = cloud.playbook(ansible, "converge")
    assert again.rc == 0 and sum(stats["changed"] for stats in again.stats.values()) == 0, again.failures()

    # Evacuation (issue 14): h2 is drained, and rg-generic moves to h1, the only other active host, with its disk.
    # The same guest answers on its floating IP (the plugin's address for it) and its own address, and still
    # has the file the play wrote on its disk.
    evacuated = cloud.playbook(ansible, "evacuate", {"host": "h2"})
    assert evacuated.rc == 0 and evacuated.failures() == [], (evacuated.failures(), evacuated.stderr[-3000:])
    moved = store.get("instances/rg-generic")
    assert moved["host"] == "h1" and (moved["uuid"], moved["interfaces"]) == (
        records["rg-generic"]["uuid"], records["rg-generic"]["interfaces"])
    assert store.get("hosts/h2")["state"] == "drained"
    assert "rg-generic" not in cloud.ssh("h2", "virsh -c qemu:///system list --all --name").stdout
    assert not cloud.host_path("h2", "/var/lib/smallcloud/instances/rg-generic").exists()
    play = cloud.dir / "after-move.yml"
    play.write_text(json.dumps([{"name": "The moved guest", "hosts": "rg-generic", "gather_facts": False, "tasks": [
        {"name": "wait", "ansible.builtin.wait_for_connection": {"timeout": 600}},
        {"name": "facts", "ansible.builtin.setup": {"gather_subset": ["network"]}},
        {"name": "the file", "ansible.builtin.command": "cat /home/debian/configured", "changed_when": False},
    ]}]))
    after = run_playbook(play, inventory=source, timeout=900)
    assert after.rc == 0 and after.failures() == [], (after.failures(), after.stderr[-3000:])
    assert host_result(after, "the file", "rg-generic")["stdout"] == "configured by ansible as rg-generic"
    addresses = host_result(after, "facts", "rg-generic")["ansible_facts"]["ansible_default_ipv4"]
    assert addresses["address"] == records["rg-generic"]["interfaces"][0]["ip"]

    teardown = cloud.playbook(ansible, "teardown")
    assert teardown.rc == 0 and teardown.failures() == [], teardown.failures()
    folders = ("networks", "instances", "floating_ips", "ipam", "mac", "floating", "locks", "placement",
               "security_groups")
    assert {folder: store.list(folder) for folder in folders} == dict.fromkeys(folders, {})
