"""`smallcloud lab`: hosts on one machine, each its own network, mount and UTS namespace with sshd and libvirtd,
reached by Ansible over SSH through the inventory `up` writes; `up` again changes nothing; `down` leaves nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.ansible import ansible_env
from harness.netns import netns_list

pytestmark = pytest.mark.e2e

SMALLCLOUD = Path(sys.executable).parent / "smallcloud"


def lab(*args, directory):
    result = subprocess.run([str(SMALLCLOUD), "lab", *args, "--dir", str(directory)], capture_output=True, text=True,
                            env=ansible_env(), timeout=300, check=False)
    return result


def machine_traces():
    """What a lab could leave: its namespaces, links, mounts and daemons outside zombies."""
    links = sorted(name for name in Path("/sys/class/net").iterdir() if name.name.startswith("sclab-"))
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if "smallcloud-lab" in line]
    processes = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True).stdout
    lab_processes = [line for line in processes.splitlines()
                     if "smallcloud-lab" in line and not line.lstrip().startswith("Z")]
    private = [path for path in ("/var/lib/smallcloud", "/var/lib/etcd", "/etc/etcd", "/var/cache/libvirt")
               if Path(path).exists()]
    return {"namespaces": [ns for ns in netns_list() if ns.startswith("sclab-")], "links": links, "mounts": mounts,
            "processes": lab_processes, "directories": private}


def ssh(inventory_dir, address, command):
    key = Path(inventory_dir) / "id_ed25519"
    options = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "BatchMode=yes"]
    return subprocess.run(["ssh", "-i", str(key), *options, "root@%s" % address, command],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("hosts", ["0", "50", "two"])
def test_a_lab_of_a_bad_size_is_refused_and_makes_nothing(tmp_path, hosts):
    before = machine_traces()
    result = lab("up", "--hosts", hosts, directory=tmp_path / "lab")
    assert result.returncode == 2, result
    assert hosts in result.stderr and ("1..16" in result.stderr or "invalid int" in result.stderr), result.stderr
    assert machine_traces() == before and not (tmp_path / "lab").exists()


def test_lab_up_reaches_each_host_over_ssh_reruns_unchanged_and_goes_down_to_nothing(tmp_path, ansible):
    directory = tmp_path / "lab"
    before = machine_traces()
    try:
        up = lab("up", "--hosts", "2", directory=directory)
        assert up.returncode == 0, up.stderr
        report = json.loads(up.stdout)
        assert report["changed"] is True and Path(report["inventory"]).is_file()

        # Each host is its own machine to whoever logs in: its hostname, its address, its libvirt and its own
        # /var/lib/smallcloud, which neither the other host nor this machine sees.
        for name, address in (("h1", "10.250.0.11"), ("h2", "10.250.0.12")):
            seen = ssh(directory, address, "hostname; ip -4 -o addr show dev eth0; virsh -c qemu:///system "
                       "list --all --name >/dev/null && echo libvirt-ok; touch /var/lib/smallcloud/mark-%s; "
                       "ls /var/lib/smallcloud" % name)
            assert seen.returncode == 0, seen.stderr
            lines = seen.stdout.split()
            assert lines[0] == name and address + "/24" in seen.stdout and "libvirt-ok" in lines
            assert "mark-%s" % name in lines and not [mark for mark in lines if mark.startswith("mark-")
                                                      and mark != "mark-%s" % name]
        assert not Path("/var/lib/smallcloud/mark-h1").exists()

        # Ansible reaches both through the inventory, as it reaches real machines.
        facts = ansible.run_tasks([{"name": "hostname", "ansible.builtin.command": "hostname", "changed_when": False}],
                                  hosts="hypervisors", inventory=report["inventory"])
        assert facts.rc == 0, facts.stdout[-2000:]
        assert [facts.results(host)[0]["stdout"] for host in ("h1", "h2")] == ["h1", "h2"]

        again = lab("up", "--hosts", "2", directory=directory)
        assert again.returncode == 0 and json.loads(again.stdout) == dict(report, changed=False, actions=[])
        status = lab("status", directory=directory)
        hosts = json.loads(status.stdout)["hosts"]
        assert status.returncode == 0 and sorted(hosts) == ["h1", "h2"] and all(all(h.values()) for h in hosts.values())
        other = lab("up", "--hosts", "3", directory=directory)
        assert other.returncode == 2 and "a lab of 2 hosts is up" in other.stderr
    finally:
        down = lab("down", directory=directory)
    assert down.returncode == 0, down.stderr
    assert machine_traces() == before and not directory.exists()
    assert lab("status", directory=directory).returncode == 1
