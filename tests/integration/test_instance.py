"""The instance module on real libvirtd, qemu-img, genisoimage and etcd, driven through Ansible.

Each test gets a world-traversable scratch directory (libvirt runs QEMU as libvirt-qemu, which cannot
enter pytest's 0700 tmp dirs) holding a small empty qcow2 base image and the instances' files, a
bridge br-<vni hex> in the root namespace standing for a network's bridge, and that network's record
in the test's private etcd prefix. The guests boot no OS: lifecycle only (the e2e test boots one).
"""

import os
import re
import socket
import subprocess
import threading
import time

import pytest

from harness.instances import NETWORK, domain_state, store_for, virsh

pytestmark = pytest.mark.integration


def test_lifecycle_check_apply_rerun_restart_stop_absent(cloud, ansible):
    name = cloud.name()
    args = cloud.args(name=name, disk_size="128M", ephemeral_disks=["16M"], cpus=1,
                      user_data="#cloud-config\npackages: [curl]\n", ssh_keys=["ssh-ed25519 AAAAC3Nza test@sct"])

    preview = ansible.run_module("instance", args, check=True, diff=True)
    assert preview["changed"] is True, preview
    assert preview["diff"]["before"]["state"] == "absent" and preview["diff"]["after"]["state"] == "running"
    assert cloud.leftovers(name) == [], "check mode changed something"

    created = ansible.run_module("instance", args, diff=True)
    assert created["changed"] is True and not created.get("failed"), created.get("msg")
    assert domain_state(name) == "running"
    record = cloud.store.get("instances/%s" % name)
    assert record["name"] == name and record["state"] == "running" and record["host"]
    [nic] = record["interfaces"]
    assert nic["network"] == NETWORK and nic["mac"].startswith("02:") and nic["ip"].startswith("10.213.0.")
    assert created["ips"] == [nic["ip"]] and created["macs"] == [nic["mac"]]
    assert cloud.store.get("ipam/%s/%s" % (NETWORK, nic["ip"]))["owner"] == "instance/%s" % name
    xml = virsh("dumpxml", name).stdout
    assert "bridge='%s'" % cloud.bridge in xml and nic["mac"] in xml and "console.log" in xml
    root = os.path.join(cloud.instances_dir, name, "root.qcow2")
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", root], capture_output=True, text=True,
                          check=True).stdout
    assert '"virtual-size": 134217728' in info and os.path.join(cloud.work, "cache") in info
    assert os.path.exists(os.path.join(cloud.instances_dir, name, "ephemeral-0.qcow2"))
    assert os.path.exists(os.path.join(cloud.instances_dir, name, "seed.iso"))
    assert created["console_log"] == os.path.join(cloud.instances_dir, name, "console.log")

    again = ansible.run_module("instance", args)
    assert again["changed"] is False, again["actions"]
    assert again["macs"] == created["macs"] and again["ips"] == created["ips"]

    bigger = dict(args, memory=96, disk_size="256M")
    resized = ansible.run_module("instance", bigger, diff=True)
    assert resized["changed"] is True and resized["needs_restart"] is True, resized
    assert resized["diff"]["before"]["memory"] == 64 and resized["diff"]["after"]["memory"] == 96
    assert domain_state(name) == "running"
    assert "<memory unit='KiB'>98304</memory>" in virsh("dumpxml", "--inactive", name).stdout
    settled = ansible.run_module("instance", bigger)
    assert settled["changed"] is False and settled["needs_restart"] is True

    stopped = ansible.run_module("instance", dict(bigger, state="stopped"))
    assert stopped["changed"] is True and domain_state(name) == "shut off"
    assert cloud.store.get("instances/%s" % name)["state"] == "stopped"
    assert ansible.run_module("instance", dict(bigger, state="stopped"))["changed"] is False

    # Start again and leave a managed save behind: absent must still undefine.
    assert ansible.run_module("instance", bigger)["changed"] is True
    assert virsh("managedsave", name).returncode == 0

    gone_args = dict(cloud.etcd.module_args, name=name, state="absent", instances_dir=cloud.instances_dir,
                     shutdown_timeout=1)
    preview = ansible.run_module("instance", gone_args, check=True)
    assert preview["changed"] is True and domain_state(name) is not None
    removed = ansible.run_module("instance", gone_args)
    assert removed["changed"] is True and not removed.get("failed"), removed
    assert cloud.leftovers(name) == []
    assert ansible.run_module("instance", gone_args)["changed"] is False


def test_batch_converges_many_and_reruns_unchanged(cloud, ansible):
    names = [cloud.name(str(i)) for i in range(3)]
    batch = cloud.args(state="stopped", instances=[
        {"name": names[0]},
        {"name": names[1], "memory": 80, "networks": [{"name": NETWORK, "ip": "10.213.0.50"}]},
        {"name": names[2], "networks": []},
    ])
    created = ansible.run_module("instance", batch)
    assert created["changed"] is True and not created.get("failed"), created.get("msg")
    by_name = {item["name"]: item for item in created["instances"]}
    assert by_name[names[1]]["ips"] == ["10.213.0.50"] and by_name[names[2]]["ips"] == []
    assert all(domain_state(name) == "shut off" for name in names)

    again = ansible.run_module("instance", batch, diff=True)
    assert again["changed"] is False, again["actions"]

    # Updates of stopped instances: an ephemeral disk and a key for one, a first NIC for another.
    changed = dict(batch, instances=[
        {"name": names[0], "ephemeral_disks": ["8M"], "ssh_keys": ["ssh-ed25519 AAAAC3Nza new@sct"]},
        batch["instances"][1],
        {"name": names[2], "networks": [NETWORK]},
    ])
    seed = os.path.join(cloud.instances_dir, names[0], "seed.iso")
    seed_before = os.stat(seed).st_mtime_ns
    updated = ansible.run_module("instance", changed, diff=True)
    assert updated["changed"] is True and not updated.get("failed"), updated.get("msg")
    by_name = {item["name"]: item for item in updated["instances"]}
    assert by_name[names[0]]["changed"] and not by_name[names[1]]["changed"]
    assert os.path.exists(os.path.join(cloud.instances_dir, names[0], "ephemeral-0.qcow2"))
    assert os.stat(seed).st_mtime_ns != seed_before
    assert "ephemeral-0.qcow2" in virsh("dumpxml", "--inactive", names[0]).stdout
    [nic] = cloud.store.get("instances/%s" % names[2])["interfaces"]
    assert by_name[names[2]]["macs"] == [nic["mac"]] and nic["mac"] in virsh("dumpxml", names[2]).stdout
    assert updated["diff"]["before"][names[2]]["interfaces"] == []
    assert ansible.run_module("instance", changed)["changed"] is False

    # A fixed IP already held by another instance is refused before anything changes.
    fixed = [{"name": NETWORK, "ip": "10.213.0.50"}]
    taken = ansible.run_module("instance", cloud.args(name=cloud.name("x"), state="stopped", networks=fixed))
    assert taken.get("failed") and "10.213.0.50" in taken["msg"] and names[1] in taken["msg"], taken
    assert cloud.leftovers(cloud.name("x")) == []

    gone = ansible.run_module("instance", dict(cloud.etcd.module_args, instances_dir=cloud.instances_dir,
                                               state="absent", instances=[{"name": n} for n in names]))
    assert gone["changed"] is True and not gone.get("failed"), gone
    assert all(cloud.leftovers(name) == [] for name in names)


class QemuEvents:
    """QMP events of every domain as `virsh qemu-monitor-event --loop` streams them, in order."""

    def __init__(self):
        self.lines = []
        # stdbuf: virsh's stdout is a pipe here, and block-buffered events would arrive late or never.
        self.proc = subprocess.Popen(["stdbuf", "-oL", "virsh", "-c", "qemu:///system", "qemu-monitor-event",
                                      "--loop"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def seen(self, event, domain):
        return any(self.parse(line) == (event, domain) for line in list(self.lines))

    @staticmethod
    def parse(line):
        """``(EVENT, domain)`` of "event POWERDOWN at 1700000000.123 for domain 'x': <null>"."""
        match = re.match(r"event (\S+) at \S+ for domain '([^']+)'", line)
        return match.groups() if match else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        return [parsed for parsed in map(self.parse, self.lines) if parsed]


def test_a_batch_asks_every_guest_to_shut_down_before_it_waits_for_any(cloud, ansible):
    """These guests run no OS and ignore ACPI, so each is forced off at its shutdown_timeout. QEMU's own
    events show the order: every POWERDOWN (the ACPI request) comes before the first forced SHUTDOWN,
    so the batch waits one timeout, not one per guest."""
    names = [cloud.name("acpi%d" % i) for i in range(3)]
    created = ansible.run_module("instance", cloud.args(instances=[{"name": n} for n in names]))
    assert created["changed"] and not created.get("failed"), created.get("msg")
    events = QemuEvents()
    try:
        # Pause and resume a guest until the stream shows it: then it listens before the batch starts.
        deadline = time.monotonic() + 60
        while not events.seen("RESUME", names[0]) and time.monotonic() < deadline:
            virsh("suspend", names[0], check=True)
            virsh("resume", names[0], check=True)
            time.sleep(0.5)
        assert events.seen("RESUME", names[0]), "virsh qemu-monitor-event streams nothing: %s" % events.lines
        gone = ansible.run_module("instance", dict(cloud.etcd.module_args, instances_dir=cloud.instances_dir,
                                                   state="absent", shutdown_timeout=3,
                                                   instances=[{"name": n} for n in names]))
    finally:
        seen = events.stop()
    assert gone["changed"] and not gone.get("failed"), gone.get("msg")
    assert all(cloud.leftovers(name) == [] for name in names)
    order = [(event, name) for event, name in seen if event in ("POWERDOWN", "SHUTDOWN") and name in names]
    assert sorted(order[:3]) == [("POWERDOWN", name) for name in names], order
    assert sorted(order[3:]) == [("SHUTDOWN", name) for name in names], order


BAD_INPUTS = {
    "unknown image": ({"image": "/var/tmp/sct-no-such-image.qcow2"}, "sct-no-such-image"),
    "unknown network": ({"networks": ["nowhere"]}, "nowhere"),
    "memory too small": ({"memory": 4}, "memory 4"),
    "memory beyond the host": ({"memory": 64 * 1024 * 1024}, "memory 67108864"),
    "cpus out of range": ({"cpus": 0}, "cpus 0"),
    "disk smaller than image": ({"disk_size": "32M"}, "disk_size 32M"),
    "name libvirt rejects": ({"name": "bad/name"}, "bad/name"),
    "user_data not YAML": ({"user_data": "#cloud-config\nkey: [unclosed\n"}, "user_data is not valid YAML"),
    "user_data not cloud-config": ({"user_data": "- just\n- a list\n"}, "not cloud-config"),
    "ip outside the network": ({"networks": [{"name": NETWORK, "ip": "10.9.9.9"}]}, "10.9.9.9"),
}


def test_bad_input_fails_clearly_and_leaves_nothing(cloud, ansible):
    # One playbook, one task per case: each must fail on its own, naming the value, leaving nothing.
    cases = sorted(BAD_INPUTS)
    names = [cloud.name("bad%d" % index) for index in range(len(cases))]
    tasks = []
    for case, name in zip(cases, names):
        args = cloud.args(name=name)
        args.update(BAD_INPUTS[case][0])
        tasks.append({"name": case, "smallcloud.kvm.instance": args, "ignore_errors": True})
    run = ansible.run_tasks(tasks)
    results = {result["_task"]: result for result in run.results()}
    for case, name in zip(cases, names):
        result, expected = results[case], BAD_INPUTS[case][1]
        assert result.get("failed"), (case, result)
        assert expected in result["msg"], (case, result["msg"])
        assert cloud.leftovers(name) == [], case
    assert not os.path.isdir(cloud.instances_dir) or not os.listdir(cloud.instances_dir)


def test_duplicate_fixed_ip_in_one_batch_is_refused(cloud, ansible):
    names = [cloud.name("d1"), cloud.name("d2")]
    fixed = [{"name": NETWORK, "ip": "10.213.0.60"}]
    result = ansible.run_module("instance", cloud.args(instances=[{"name": n, "networks": fixed} for n in names]))
    assert result.get("failed") and "10.213.0.60" in result["msg"], result
    assert all(cloud.leftovers(name) == [] for name in names)


def test_cloud_info_flags_a_domain_undefined_behind_the_records_back(cloud, ansible):
    name = cloud.name("info")
    created = ansible.run_module("instance", cloud.args(name=name, state="stopped"))
    assert created["changed"] is True and not created.get("failed"), created.get("msg")

    # Registered as this machine, the instance is adopted there by placement: cloud_info shows the host's
    # reservation and the placement's reason.
    store = store_for(cloud.etcd)
    store.put("hosts/hv-info", {"name": "hv-info", "hostname": socket.gethostname(), "state": "active",
                                "capacity": {"vcpus": 2, "memory_mb": 1024, "disk_gb": 10}})
    placed = ansible.run_module("placement", dict(cloud.etcd.module_args, instances=[
        {"name": name, "memory": 64, "host": "hv-info"}]))
    assert placed.get("placements", {}).get(name) == {"host": "hv-info", "reason": "adopted where it already ran",
                                                      "new": True}, placed

    info = ansible.run_module("cloud_info", dict(cloud.etcd.module_args))
    assert not info.get("failed") and info["changed"] is False, info.get("msg")
    assert info["hosts"]["hv-info"]["reserved"] == {"vcpus": 1, "memory_mb": 64, "disk_gb": 0}
    assert info["hosts"]["hv-info"]["free"] == {"vcpus": 7.0, "memory_mb": 960.0, "disk_gb": 10.0}
    assert info["hosts"]["hv-info"]["placed"] == [name] and info["placements"][name]["host"] == "hv-info"
    assert info["instances"][name]["interfaces"][0]["mac"] == created["macs"][0]
    assert info["domains"][name] == {"managed": True, "state": "stopped", "macs": created["macs"],
                                     "bridges": [cloud.bridge]}
    assert info["networks"]["lan"]["bridge_present"] is True
    assert [d for d in info["differences"] if d["name"] == name] == []

    virsh("undefine", name, check=True)
    info = ansible.run_module("cloud_info", dict(cloud.etcd.module_args))
    assert {"kind": "instance", "name": name, "problem": "recorded on this host but not defined"} in info["differences"]

    # state=absent still cleans up what is left: files, allocations, record.
    gone = ansible.run_module("instance", dict(cloud.etcd.module_args, name=name, state="absent",
                                               instances_dir=cloud.instances_dir))
    assert gone["changed"] is True and cloud.leftovers(name) == []
    assert "release the placement on hv-info" in gone["actions"]
    assert store.list("placement") == {}
    store.delete("hosts/hv-info")


def test_four_runs_creating_one_instance_at_once_all_succeed_with_one_domain(cloud, ansible):
    # Issue 15: a run that finds, under the instance's lock, the instance created by a concurrent run as
    # declared looks again and succeeds unchanged, instead of failing with "changed by someone else".
    name = cloud.name("race")
    args = cloud.args(name=name, state="stopped")
    results = [None] * 4

    def converge(index):
        results[index] = ansible.run_module("instance", args)

    threads = [threading.Thread(target=converge, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert [result.get("msg") for result in results if result.get("failed")] == []
    assert sum(result["changed"] for result in results) >= 1
    assert virsh("list", "--all", "--name").stdout.split().count(name) == 1
    owner = "instance/%s" % name
    assert [v for v in cloud.store.list("ipam/%s" % NETWORK).values() if v.get("owner") == owner] != []
    assert len([v for v in cloud.store.list("mac").values() if v.get("owner") == owner]) == 1
    assert len([v for v in cloud.store.list("ipam/%s" % NETWORK).values() if v.get("owner") == owner]) == 1
    gone = ansible.run_module("instance", dict(args, state="absent"))
    assert gone["changed"] is True and cloud.leftovers(name) == []


def test_a_failed_creation_undoes_its_allocations_and_record(cloud, ansible):
    name = cloud.name("fail")
    # Validation passes; creating the instance's directory then fails: MAC and IP were already allocated.
    result = ansible.run_module("instance", cloud.args(name=name, instances_dir="/proc/sct-cannot-write"))
    assert result.get("failed") and "/proc/sct-cannot-write" in result["msg"] and name in result["msg"], result
    assert result["error"] == "HostError"
    assert cloud.leftovers(name) == []
