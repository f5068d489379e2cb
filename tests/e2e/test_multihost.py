"""The cloud across a lab of three hosts (issue 12), through the public playbooks only, over SSH.

One lab, one deploy and one boot of three tiny guests serve every assertion: the 3-member etcd cluster with
client-certificate TLS, a network whose gateway is on h1 carrying guests of h2 and h3 over VXLAN, DHCP
from the addresses etcd allocated, reachability shown from a guest itself, a floating IP from the outside,
the re-run that changes nothing, a lost hypervisor, and the teardown that leaves nothing.
"""

import json
import re
import subprocess
import sys

import pytest
from harness.netns import netns_list
from harness.ports import wait_for
from labcloud import HOSTS, LabCloud
from test_lab import lab, machine_traces

pytestmark = pytest.mark.e2e

UNDERLAY_HOST, OUTSIDE_NS, OUTSIDE_IP = "10.250.0.1", "sclab-outside", "10.250.0.254"
POOL = "198.18.61.0/24"  # egress and floating addresses; the uplink (outside namespace) routes it to h1
PEER_IP, ISOLATED_IP = "10.61.0.30", "10.62.0.30"
# What runs the cloud (issue 15): HTTP listens on every address of h1 (the gateway's host: its underlay and the
# host end of the egress link) and of h2 (the guest's own host); no guest may reach any of them.
CONTROL_PLANE = ("10.250.0.11", "169.254.0.1", "10.250.0.12")
# Shell-script user-data runs once the tiny guest is up: every 2 s it tries HTTP to the other guests and
# the outside (busybox nc: the static busybox's wget crashes), all targets at once (a dropped one costs its 2 s
# timeout once per round, not once per target), and says what answered on its console.
PROBE = """#!/bin/sh
TARGETS="%s"
n=0
while true; do
  n=$((n + 1))
  for target in $TARGETS; do
    (if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 "$target" 80 | grep -q '200 OK'; then
       echo ok > /tmp/probe.$target; else echo fail > /tmp/probe.$target; fi) &
  done
  wait
  line="SMALLCLOUD-PROBE $n"
  for target in $TARGETS; do
    line="$line $target=$(cat /tmp/probe.$target)"
  done
  echo "$line"
  sleep 2
done
""" % " ".join([PEER_IP, ISOLATED_IP, OUTSIDE_IP, *CONTROL_PLANE])
BOOT_TIMEOUT = 420


class Cloud(LabCloud):
    """The lab cloud of three tiny guests."""

    def __init__(self, directory, image_url, image_sha256):
        super().__init__(directory)
        self.image = image = {"url": image_url, "checksum": "sha256:" + image_sha256}

        self.data = {
            "cloud_images": [image],
            "cloud_networks": [
                {"name": "mh-net1", "cidr": "10.61.0.0/24", "nat": True, "egress_pool": POOL, "gateway_host": "h1"},
                {"name": "mh-net2", "cidr": "10.62.0.0/24", "gateway_host": "h1"},
            ],
            "cloud_instances": [
                self.guest("mh-g2", "h2", "mh-net1", user_data=PROBE),
                self.guest("mh-g3", "h3", {"name": "mh-net1", "ip": PEER_IP}, security_groups=["mh-web"]),
                self.guest("mh-g3b", "h3", {"name": "mh-net2", "ip": ISOLATED_IP}),
            ],
            "cloud_floating_ips": [{"network": "mh-net1", "instance": "mh-g3", "pool": POOL}],
            # mh-g3 answers HTTP on its floating IP; the others, in no group, only their own network.
            "cloud_security_groups": [{"name": "mh-web", "rules": [{"protocol": "tcp", "port": 80}]}],
        }

    def guest(self, name, host, network, **extra):
        return {"name": name, "host": host, "image": self.image["url"], "image_checksum": self.image["checksum"],
                "memory": 128, "cpus": 1, "networks": [network], **extra}

    def booted_console(self, host, name):
        """The console of a guest once it says it is ready, else ""."""
        text = self.console(host, name)
        return text if "SMALLCLOUD-READY" in text else ""


def probes(console):
    """The probe lines of a console: [{target: "ok"|"fail"}] in order."""
    return [dict(item.split("=") for item in line.split()[2:])
            for line in re.findall(r"SMALLCLOUD-PROBE \d+(?: \S+=(?:ok|fail))+", console)]


def in_outside(*argv, timeout=30):
    return subprocess.run(["ip", "netns", "exec", OUTSIDE_NS, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, tiny_image):
    """A 3-host lab with the image served on the underlay, deployed; down to nothing afterwards."""
    before = machine_traces()
    directory = tmp_path_factory.mktemp("multihost") / "lab"
    up = lab("up", "--hosts", "3", directory=directory)
    servers = []
    try:
        assert up.returncode == 0, up.stderr
        servers.append(subprocess.Popen(  # noqa: S603 - argv list
            [sys.executable, "-m", "http.server", "8097", "--bind", UNDERLAY_HOST, "--directory",
             str(tiny_image.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # The uplink router routes the cloud's outside addresses to the gateway host, and answers HTTP itself.
        subprocess.run(["ip", "-n", OUTSIDE_NS, "route", "add", POOL, "via", HOSTS["h1"]], check=True)
        (directory / "outside").mkdir()
        (directory / "outside" / "index.html").write_text("outside\n")
        servers.append(subprocess.Popen(  # noqa: S603 - argv list
            ["ip", "netns", "exec", OUTSIDE_NS, sys.executable, "-m", "http.server", "80", "--bind", OUTSIDE_IP,
             "--directory", str(directory / "outside")],
            stdout=subprocess.DEVNULL, stderr=open(directory / "outside.log", "w")))  # noqa: SIM115
        for host in ("h1", "h2"):  # a service of the hypervisor, on all its addresses
            servers.append(subprocess.Popen(  # noqa: S603 - argv list
                ["ip", "netns", "exec", "sclab-" + host, sys.executable, "-m", "http.server", "80", "--bind",
                 "0.0.0.0", "--directory", str(directory / "outside")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield Cloud(directory, "http://%s:8097/tiny.qcow2" % UNDERLAY_HOST, tiny_image.checksums()["tiny.qcow2"])
    finally:
        for server in servers:
            server.kill()
            server.wait()
        down = lab("down", directory=directory)
    assert down.returncode == 0, down.stderr
    assert machine_traces() == before and not [ns for ns in netns_list() if ns.startswith("scnet-")]


def test_the_cloud_across_three_lab_hosts(cloud, ansible):
    # deploy: a 3-member etcd cluster that speaks TLS and wants client certificates, three hypervisors.
    deploy = cloud.playbook(ansible, "deploy")
    assert deploy.rc == 0 and deploy.failures() == [], (deploy.failures(), deploy.stderr[-2000:])
    store, client = cloud.store()
    assert {name: record["underlay_address"] for name, record in store.list("hosts").items()} == HOSTS
    assert sorted(client["endpoints"]) == ["https://%s:2379" % address for address in sorted(HOSTS.values())]
    ca = str(cloud.host_path("h1", client["ca_cert"]))
    health = "https://%s:2379/health" % HOSTS["h2"]
    assert subprocess.run(["curl", "-sf", "--max-time", "5", "http://%s:2379/health" % HOSTS["h2"]],
                          check=False).returncode != 0
    no_cert = subprocess.run(["curl", "-sf", "--max-time", "5", "--cacert", ca, health], check=False)
    assert no_cert.returncode != 0, "etcd answered a client without a certificate"
    with_cert = subprocess.run(["curl", "-sf", "--max-time", "5", "--cacert", ca, "--cert",
                                str(cloud.host_path("h1", client["cert"])), "--key",
                                str(cloud.host_path("h1", client["key"])), health],
                               capture_output=True, text=True, check=False)
    assert '"health":"true"' in with_cert.stdout, with_cert

    # converge: the gateway on h1, guests on h2 and h3, every host meshed with the two others.
    converge = cloud.playbook(ansible, "converge")
    assert converge.rc == 0 and converge.failures() == [], (converge.failures(), converge.stderr[-2000:])
    fdb = cloud.ssh("h1", "bridge fdb show | grep '^00:00:00:00:00:00'")
    assert sorted(set(re.findall(r"dst (\S+)", fdb.stdout))) == [HOSTS["h2"], HOSTS["h3"]], fdb.stdout
    instances = {name: record for name, record in store.list("instances").items() if "/" not in name}
    assert sorted(instances) == ["mh-g2", "mh-g3", "mh-g3b"]
    assert {name: record["host"] for name, record in instances.items()} == {
        "mh-g2": "h2", "mh-g3": "h3", "mh-g3b": "h3"}

    # Each guest got, over DHCP across VXLAN from h1, the address etcd allocated for it.
    for name, record in instances.items():
        console = wait_for(lambda name=name, host=record["host"]: cloud.booted_console(host, name), BOOT_TIMEOUT,
                           interval=3, what="%s to boot" % name)
        leased = re.findall(r"SMALLCLOUD-IP eth0 (\S+)", console)
        assert leased and leased[0].split("/")[0] == record["interfaces"][0]["ip"], (name, console[-1500:])

    # From the guest on h2 itself: the guest on h3 and the outside answer; the other network's guest does not.
    seen_before = len(probes(cloud.console("h2", "mh-g2")))
    rounds = wait_for(lambda: [p for p in probes(cloud.console("h2", "mh-g2"))[seen_before:]
                               if p[PEER_IP] == "ok" and p[OUTSIDE_IP] == "ok"], BOOT_TIMEOUT, interval=3,
                      what="mh-g2 to reach mh-g3 and outside")
    assert rounds[-1][ISOLATED_IP] == "fail", rounds
    # Nothing of the hypervisors answers the guest: each host's fence drops it (issue 15).
    assert [target for target in CONTROL_PLANE if rounds[-1][target] != "fail"] == [], rounds[-1]
    floating = [record for record in store.list("floating_ips").values() if record.get("instance") == "mh-g3"]
    egress = store.get("networks/mh-net1")["egress_address"]
    outside_log = (cloud.dir / "outside.log").read_text()
    assert egress in outside_log and instances["mh-g2"]["interfaces"][0]["ip"] not in outside_log

    # The floating IP of the guest on h3 answers from the outside namespace: its group mh-web opens port 80.
    def floating_answer():
        return in_outside("curl", "-s", "--max-time", "3", "http://%s/hostname" % floating[0]["address"]).stdout.strip()

    answer = wait_for(floating_answer, 60, interval=3, what="the floating IP to answer")
    assert answer == "mh-g3"

    # Without h1's fence, the guest reaches h1's service through its gateway; the next converge puts it back.
    # That converge also closes port 80 in mh-web: h3 rewrites its guest filter, the guest keeps running, the
    # floating IP stops answering, and mh-g2 (same network) still reaches mh-g3 on port 80.
    assert cloud.ssh("h1", "nft delete table inet smallcloud_fence").returncode == 0
    seen = len(probes(cloud.console("h2", "mh-g2")))
    open_rounds = wait_for(lambda: [p for p in probes(cloud.console("h2", "mh-g2"))[seen:]
                                    if p["169.254.0.1"] == "ok" and p["10.250.0.11"] == "ok"], 120, interval=3,
                           what="mh-g2 to reach h1 without its fence")
    assert open_rounds
    closed = [{"name": "mh-web", "rules": [{"protocol": "tcp", "port": 8080}]}]
    domain_id = cloud.ssh("h3", "virsh -c qemu:///system domid mh-g3").stdout.strip()
    fenced = cloud.playbook(ansible, "converge", {"cloud_security_groups": closed})
    assert fenced.rc == 0 and fenced.failures() == [], fenced.failures()
    assert cloud.ssh("h1", "nft list table inet smallcloud_fence").returncode == 0
    assert "dport 8080" in cloud.ssh("h3", "nft list table inet smallcloud_guests").stdout
    assert floating_answer() == "", "port 80 answers on the floating IP although mh-web no longer opens it"
    seen = len(probes(cloud.console("h2", "mh-g2")))
    wait_for(lambda: [p for p in probes(cloud.console("h2", "mh-g2"))[seen + 1:]
                      if all(p[target] == "fail" for target in CONTROL_PLANE) and p[OUTSIDE_IP] == "ok"
                      and p[PEER_IP] == "ok"], 120, interval=3, what="h1's fence to be back")
    assert cloud.ssh("h3", "virsh -c qemu:///system domid mh-g3").stdout.strip() == domain_id  # not restarted
    reopened = cloud.playbook(ansible, "converge")
    assert reopened.rc == 0 and reopened.failures() == [], reopened.failures()
    assert wait_for(floating_answer, 30, interval=3, what="the floating IP to answer again") == "mh-g3"

    # The re-run changes nothing on any host.
    again = cloud.playbook(ansible, "converge")
    assert again.rc == 0 and {host: stats["changed"] for host, stats in again.stats.items()} == dict.fromkeys(
        HOSTS, 0), [(t["task"]["name"], h) for t in again.tasks for h, r in t["hosts"].items() if r.get("changed")]

    # A hypervisor that cannot be reached: the others converge, its instances' records stay as they were.
    before = {name: (r["uuid"], r["interfaces"]) for name, r in store.list("instances").items() if "/" not in name}
    cloud.stop_sshd("h3")
    lost = cloud.playbook(ansible, "converge")
    assert lost.stats["h3"]["unreachable"] == 1 and all(lost.stats[h]["failures"] == 0 for h in ("h1", "h2"))
    after = {name: (r["uuid"], r["interfaces"]) for name, r in store.list("instances").items() if "/" not in name}
    assert after == before
    assert lab("up", "--hosts", "3", directory=cloud.dir).returncode == 0  # starts h3's sshd again
    back = cloud.playbook(ansible, "converge")
    assert back.rc == 0 and sum(stats["changed"] for stats in back.stats.values()) == 0, back.failures()

    # With the etcd member of h1 (every client's first endpoint) stopped, a converge that adds an instance
    # succeeds: the modules go on to the next member.
    assert cloud.ssh("h1", "/etc/init.d/etcd stop").returncode == 0
    try:
        added = cloud.playbook(ansible, "converge", {"cloud_instances": [
            *cloud.data["cloud_instances"], cloud.guest("mh-g2b", "h2", "mh-net1")]})
        assert added.rc == 0 and added.failures() == [], added.failures()
    finally:
        assert cloud.ssh("h1", "/etc/init.d/etcd start").returncode == 0
    assert store.get("instances/mh-g2b")["host"] == "h2"

    # A hypervisor gone for good leaves the inventory: the next converge of the others takes it out of every mesh.
    two_hosts = cloud.dir / "two-hosts.ini"
    two_hosts.write_text("".join(line for line in cloud.inventory.read_text().splitlines(keepends=True)
                                 if not line.startswith("h3 ")))
    without_h3 = {"cloud_instances": [i for i in cloud.data["cloud_instances"] if i["host"] != "h3"] + [
        cloud.guest("mh-g2b", "h2", "mh-net1")], "cloud_floating_ips": []}
    shrunk = cloud.playbook(ansible, "converge", without_h3, inventory=two_hosts)
    assert shrunk.rc == 0 and shrunk.failures() == [], shrunk.failures()
    for host in ("h1", "h2"):
        peers = set(re.findall(r"dst (\S+)", cloud.ssh(host, "bridge fdb show | grep '^00:00:00:00:00:00'").stdout))
        assert peers == set(HOSTS.values()) - {HOSTS[host], HOSTS["h3"]}, (host, peers)
    assert HOSTS["h3"] not in store.get("networks/mh-net1")["vteps"]
    # (Back in the inventory, h3 rejoins the meshes, so that teardown finds every host carrying every network.)
    rejoined = cloud.playbook(ansible, "converge", {"cloud_instances": [
        *cloud.data["cloud_instances"], cloud.guest("mh-g2b", "h2", "mh-net1")]})
    assert rejoined.rc == 0 and rejoined.failures() == [], rejoined.failures()
    assert HOSTS["h3"] in store.get("networks/mh-net1")["vteps"]

    evacuate_h2_with_kills(cloud, ansible, store)

    # teardown leaves no domain, link, namespace or nft table on any host, and in etcd only what deploy wrote
    # (the hosts' registrations).
    teardown = cloud.playbook(ansible, "teardown")
    assert teardown.rc == 0 and teardown.failures() == [], teardown.failures()
    for host in HOSTS:
        left = cloud.ssh(host, "virsh -c qemu:///system list --all --name; ip -br link | grep -E '^(vx|br|vg|ve)-'; "
                         "ip netns list; nft list tables")
        assert left.stdout.strip() == "", (host, left.stdout)
    folders = ("networks", "instances", "floating_ips", "vni", "ipam", "mac", "floating", "locks", "placement",
               "security_groups")
    assert {folder: store.list(folder) for folder in folders} == dict.fromkeys(folders, {})
    assert sorted(store.list("hosts")) == sorted(HOSTS)


def domains_of(cloud):
    """``{host: {domain: state}}`` on every lab host."""
    listing = {}
    for host in HOSTS:
        out = cloud.ssh(host, "for d in $(virsh -c qemu:///system list --all --name); do "
                              "echo $d $(virsh -c qemu:///system domstate $d | tr ' ' _); done").stdout
        listing[host] = dict(line.split() for line in out.splitlines() if line.strip())
    return listing


def evacuate_h2_with_kills(cloud, ansible, store):
    """Issue 14: h2 is drained; its two guests move, with their identity, to the hosts placement chooses. Runs
    killed at several points of the first guest's move, then of the second's, are finished by running it again:
    exactly one copy of each guest, running, and nothing left on either side."""
    moving = ("mh-g2", "mh-g2b")
    before = {name: store.get("instances/" + name) for name in moving}
    assert {name: record["host"] for name, record in before.items()} == dict.fromkeys(moving, "h2")

    def incoming(name):
        return any(cloud.host_path(host, "/var/lib/smallcloud/instances/.incoming-%s" % name).exists()
                   for host in HOSTS)

    def record(name):
        return store.get("instances/" + name) or {}

    # What a killed run had done when it was killed: each kill lands in a later step than the one before.
    kill_points = [
        ("reserve", lambda: bool(record("mh-g2").get("moving_to"))),
        ("export", lambda: "shut_off" in domains_of(cloud)["h2"].get("mh-g2", "")),
        ("copy", lambda: incoming("mh-g2")),
        ("import", lambda: record("mh-g2").get("moving_to") in HOSTS and cloud.host_path(
            record("mh-g2")["moving_to"], "/var/lib/smallcloud/instances/mh-g2").exists()),
        ("commit", lambda: record("mh-g2").get("host") not in ("h2", None)),
        ("second guest's export", lambda: "shut_off" in domains_of(cloud)["h2"].get("mh-g2b", "")),
    ]
    killed = []
    for index, (point, done) in enumerate(kill_points):
        if cloud.killed_playbook("evacuate", {"host": "h2"}, done, jitter=0.3 * (index % 3)):
            killed.append(point)
    assert len(killed) >= 4, (killed, sorted(cloud.dir.parent.glob("killed-*.log")))  # most are reached

    finished = cloud.playbook(ansible, "evacuate", {"host": "h2"})
    assert finished.rc == 0 and finished.failures() == [], (killed, finished.failures(), finished.stderr[-2000:])

    after = {name: record(name) for name in moving}
    domains = domains_of(cloud)
    for name in moving:
        target = after[name]["host"]
        assert target in ("h1", "h3") and "moving_to" not in after[name], after[name]
        # The same guest: UUID, MACs and addresses kept.
        assert (after[name]["uuid"], after[name]["interfaces"]) == (before[name]["uuid"], before[name]["interfaces"])
        # Exactly one copy, running on its record's host; nothing left on h2, no copy waiting anywhere.
        copies = {host: listing[name] for host, listing in domains.items() if name in listing}
        assert copies == {target: "running"}, (name, killed, copies)
        assert not cloud.host_path("h2", "/var/lib/smallcloud/instances/" + name).exists()
        assert not incoming(name)
        placed = store.get("placement/instances/" + name)
        assert placed["host"] == target and "moving_to" not in placed, placed
    ledgers = store.list("placement/hosts")
    assert "h2" not in ledgers and sorted(n for ledger in ledgers.values() for n in ledger["instances"]
                                          if n in moving) == sorted(moving), ledgers
    assert store.get("hosts/h2")["state"] == "drained"

    # The moved guest boots on its new host and reaches its peer on h3 and the outside again.
    target = after["mh-g2"]["host"]
    seen = len(probes(cloud.console(target, "mh-g2")))
    wait_for(lambda: [p for p in probes(cloud.console(target, "mh-g2"))[seen:]
                      if p[PEER_IP] == "ok" and p[OUTSIDE_IP] == "ok"], BOOT_TIMEOUT, interval=3,
             what="mh-g2 to answer from %s" % target)

    # Evacuating it again is refused (drained already), and so is a host that does not exist; nothing changes.
    keys = store.list("")
    again = cloud.playbook(ansible, "evacuate", {"host": "h2"})
    messages = [msg for _task, _host, msg in again.failures()]
    assert again.rc != 0 and any("h2 is drained already" in msg for msg in messages), messages
    unknown = cloud.playbook(ansible, "evacuate", {"host": "h9"})
    assert unknown.rc != 0 and any("host=h9 is not a hypervisor" in msg for _task, _host, msg in unknown.failures())
    assert store.list("") == keys

    # `status: active` takes it back into placement.
    play = cloud.dir / "activate.yml"
    play.write_text(json.dumps([{"name": "Activate h2", "hosts": "h2", "gather_facts": False,
                                 "tasks": [{"smallcloud.kvm.host": {"name": "h2", "status": "active"}}]}]))
    active = ansible.run_playbook(play, inventory=cloud.inventory)
    assert active.rc == 0 and active.failures() == [], active.failures()
    assert store.get("hosts/h2")["state"] == "active"
