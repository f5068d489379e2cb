"""Faults injected into converges of one declared cloud on this host, through the cloud role and the modules
as a user runs them: runs killed with SIGKILL at many points, libvirtd restarted and the etcd leader killed in
the middle of a batch of instances, the image cache's file system full, eight controllers at once.

Every fault is injected from outside, as an operator's bad day would: a run is killed when the test sees
what it was doing (an etcd key, a file in the cache or an instance's directory, a domain, a link, a namespace,
an nft rule), so the product carries no test hook. After each fault a re-run must converge to what one clean
run of the same declaration makes (``clean_shape``), with every VNI, address and MAC unique and named by the
record of its owner, and a teardown must leave nothing of the cloud behind.

One declaration serves every test: a NAT network with an egress pool, three instances on it (they boot no
OS: the tiny empty image of the other integration tests), one floating IP. Locks of killed runs expire after
``LOCK_TTL`` seconds (the operator's ``cloud_etcd_lock_ttl``), so a re-run does not wait a minute.
"""

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from harness.ansible import ansible_env, local_inventory
from harness.etcd import b64, etcd_request
from harness.httpserver import HttpServer, QuietHandler
from harness.libvirtd import kvm_device_for_qemu
from harness.netns import delete_netns
from harness.ports import wait_for
from harness.processes import kill_tree

from ansible_collections.smallcloud.kvm.plugins.module_utils.state.allocators import pool_key

pytestmark = pytest.mark.integration

TOKEN = uuid.uuid4().hex[:4]  # domain names are host-wide: this module's own
NET = "ftnet"
CIDR = "10.197.0.0/24"
# The egress pool's addresses are routed in the host's own namespace: a pool of its own for each run of this
# module, so that two at once (two checkouts on one machine) never route one address twice.
POOL = "198.18.%d.0/24" % random.randint(128, 254)
INSTANCES = ["ft%s-%s" % (TOKEN, letter) for letter in "abc"]
FLOATING = INSTANCES[0]
LOCK_TTL = 2  # etcd's shortest lease (with its default election timeout) is 2 s anyway
ALLOCATION_FOLDERS = ("vni", "mac", "ipam", "floating")
# What a teardown keeps on purpose: the hypervisor's registration and the objects' event logs.
KEPT_AFTER_TEARDOWN = ("hosts/", "events/")
VIRSH = ["virsh", "-c", "qemu:///system"]
IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


# The site: one served image, the play, the scratch directories ----------------------------------------------


class SlowHandler(QuietHandler):
    """Serves files in small pieces with pauses, so that a download lasts long enough to be seen (and killed)."""

    def copyfile(self, source, outputfile):
        while True:
            piece = source.read(32 << 10)
            if not piece:
                return
            outputfile.write(piece)
            time.sleep(0.05)


@dataclasses.dataclass
class Site:
    """What every test shares: the work directory, the served images, the role's play, the underlay."""

    work: Path
    server: HttpServer
    image: dict
    big_image: dict
    play: Path
    underlay: str


def sha256(path):
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_images(served):
    """The tiny empty image of the other integration tests, and one of 3 MiB of random data (for a full disk)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(served / "base.qcow2"), "64M"], check=True)
    (served / "random.raw").write_bytes(os.urandom(3 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(served / "random.raw"),
                    str(served / "big.qcow2")], check=True)
    (served / "random.raw").unlink()


def default_route_interface():
    routes = subprocess.run(["ip", "-json", "route", "show", "default"], capture_output=True, text=True, check=True)
    return json.loads(routes.stdout)[0]["dev"]


@pytest.fixture(scope="module")
def site(libvirtd):
    work = Path(tempfile.mkdtemp(prefix="sct-faults-", dir="/var/tmp"))
    work.chmod(0o755)  # libvirt's QEMU user reaches the disks below it
    served = work / "served"
    served.mkdir()
    make_images(served)
    server = HttpServer(served, SlowHandler)
    play = work / "cloud.yml"
    play.write_text(json.dumps([{"name": "cloud", "hosts": "localhost", "gather_facts": False,
                                 "roles": ["smallcloud.kvm.cloud"]}]))
    try:
        with kvm_device_for_qemu():
            yield Site(work, server,
                       {"url": server.url("base.qcow2"), "checksum": sha256(served / "base.qcow2")},
                       {"url": server.url("big.qcow2"), "checksum": sha256(served / "big.qcow2")},
                       play, default_route_interface())
    finally:
        remove_domains()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def remove_domains():
    """Only when a teardown failed: never leave one of this module's domains behind."""
    names = subprocess.run([*VIRSH, "list", "--all", "--name"], capture_output=True, text=True, check=False)
    for name in names.stdout.split():
        if name in INSTANCES:
            subprocess.run([*VIRSH, "destroy", name], capture_output=True, check=False)
            subprocess.run([*VIRSH, "undefine", name, "--nvram"], capture_output=True, check=False)


# One cloud: the declaration on one etcd prefix, its records and what is on the host ------------------------


class Cloud:
    """The declared cloud on etcd ``endpoints`` under a fresh prefix, with its own cache and instance dirs."""

    def __init__(self, site, endpoints, label):
        self.site = site
        self.endpoints = list(endpoints)
        self.prefix = "/smallcloud-faults/%s/v1" % uuid.uuid4().hex[:12]
        self.dir = site.work / label
        self.dir.mkdir()
        self.cache_dir = self.dir / "cache"
        self.instances_dir = self.dir / "instances"
        self.vnis = set()  # every VNI this cloud ever held: its links and namespaces must all be gone at the end
        self.runs = 0

    # the declaration ---------------------------------------------------------------------------------------

    @property
    def etcd_args(self):
        return {"etcd_endpoints": self.endpoints, "etcd_prefix": self.prefix, "etcd_lock_ttl": LOCK_TTL}

    def network(self):
        return {"name": NET, "cidr": CIDR, "nat": True, "egress_pool": POOL}

    def instances(self):
        image = self.site.image
        return [{"name": name, "image": image["url"], "image_checksum": image["checksum"], "memory": 64,
                 "networks": [NET]} for name in INSTANCES]

    def variables(self, **extra):
        """The cloud role's variables for the whole declaration."""
        return {
            "cloud_etcd_endpoints": self.endpoints, "cloud_etcd_prefix": self.prefix, "cloud_etcd_lock_ttl": LOCK_TTL,
            "cloud_image_cache_dir": str(self.cache_dir), "cloud_instances_dir": str(self.instances_dir),
            "cloud_shutdown_timeout": 0,  # the guests boot no OS, so ACPI never stops them
            "cloud_underlay_interface": self.site.underlay,
            "cloud_images": [self.site.image], "cloud_networks": [self.network()],
            "cloud_instances": self.instances(),
            "cloud_floating_ips": [{"network": NET, "instance": FLOATING, "pool": POOL}],
            **extra,
        }

    def step_play(self, step):
        """A play of the one module call the role makes for ``step`` (its options as the role passes them)."""
        calls = {
            "image": {"smallcloud.kvm.image": {**self.site.image, "cache_dir": str(self.cache_dir)}},
            "network": {"smallcloud.kvm.network": {**self.network(), "gateway": True, "mesh_hosts": ["localhost"],
                                                   "underlay_interface": self.site.underlay}},
            "instance": {"smallcloud.kvm.instance": {
                "instances": self.instances(), "uri": "qemu:///system", "instances_dir": str(self.instances_dir),
                "shutdown_timeout": 0, "cache_dir": str(self.cache_dir), "detected_virt_type": "qemu"}},
            "floating_ip": {"smallcloud.kvm.floating_ip": {"network": NET, "instance": FLOATING, "pool": POOL}},
        }
        return [{"name": "step %s" % step, "hosts": "localhost", "gather_facts": False,
                 "module_defaults": {"group/smallcloud.kvm.cloud": self.etcd_args},
                 "tasks": [dict(calls[step], name=step)]}]

    # running -----------------------------------------------------------------------------------------------

    def start(self, play, variables=None, playbook=None):
        """ansible-playbook on ``play`` (a list of plays) or ``playbook``, in its own session; a Run."""
        self.runs += 1
        run_dir = self.dir / ("run-%d" % self.runs)
        run_dir.mkdir()
        path = playbook or run_dir / "play.json"
        if play is not None:
            path.write_text(json.dumps(play))
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), str(path), "-i", str(local_inventory(run_dir))]
        if variables is not None:
            (run_dir / "vars.json").write_text(json.dumps(variables))
            argv += ["-e", "@%s" % (run_dir / "vars.json")]
        # stderr apart: a warning there (a library's deprecation, printed on import) is no part of the JSON report.
        output, errors = open(run_dir / "output.json", "w+"), open(run_dir / "errors.log", "w")
        with errors:
            process = subprocess.Popen(argv, stdout=output, stderr=errors, env=ansible_env(), start_new_session=True)
        return Run(process, output)

    def converge(self, **extra):
        """The cloud role on the whole declaration, to its end; the Run."""
        return self.start(None, self.variables(**extra), playbook=self.site.play).wait()

    def step(self, step):
        return self.start(self.step_play(step)).wait()

    def teardown(self):
        """The public teardown playbook, with the connection and paths of this cloud."""
        variables = self.variables(smallcloud_hypervisor_hosts="localhost", cloud_instances=[], cloud_networks=[],
                                   cloud_floating_ips=[])
        return self.start(None, variables, playbook="smallcloud.kvm.teardown").wait()

    # what etcd holds ---------------------------------------------------------------------------------------

    def every_key(self):
        """The etcd range of every key of the cloud."""
        folder = self.prefix + "/"
        return {"key": b64(folder), "range_end": b64(folder[:-1] + chr(ord(folder[-1]) + 1))}

    def keys(self):
        """``{relative key: (value, create_revision)}`` of every key of the cloud, and etcd's revision."""
        answer = self.etcd("kv/range", self.every_key())
        found = {}
        for kv in answer.get("kvs") or []:
            key = unb64(kv["key"])[len(self.prefix) + 1:]
            found[key] = (json.loads(unb64(kv["value"])), int(kv.get("create_revision", 0)))
        return found, int(answer["header"]["revision"])

    def etcd(self, path, body):
        """One request to the first member that answers (a member may have been killed)."""
        errors = []
        for endpoint in self.endpoints:
            try:
                return etcd_request(endpoint, path, body)
            except OSError as error:
                errors.append("%s: %s" % (endpoint, error))
        raise AssertionError("no etcd member answered: %s" % "; ".join(errors))

    def records(self):
        """``{folder: {rest of the key: value}}`` of every key of the cloud."""
        records = {}
        for key, (value, _revision) in self.keys()[0].items():
            folder, _sep, rest = key.partition("/")
            records.setdefault(folder, {})[rest] = value
        for network in records.get("networks", {}).values():
            self.vnis.add(network["vni"])
        self.vnis.update(int(vni) for vni in records.get("vni", {}))
        return records

    def delete_keys(self):
        self.etcd("kv/deleterange", self.every_key())


def unb64(text):
    return base64.b64decode(text or "").decode("utf-8")


def actions_of(result):
    """A task result's actions, or those of each of its loop's items."""
    return result.get("actions") or [item.get("actions") for item in result.get("results") or []]


class Run:
    """One ansible-playbook process and its JSON report."""

    def __init__(self, process, output):
        self.process = process
        self.output = output
        self.killed = None  # the point it was killed at

    def wait(self, timeout=600):
        self.process.wait(timeout=timeout)
        return self

    @property
    def rc(self):
        return self.process.returncode

    def kill(self):
        """SIGKILL ansible-playbook and every process it started (its modules and their commands too)."""
        if self.process.poll() is None:
            kill_tree(self.process.pid)
        self.process.wait()

    @functools.cached_property
    def report(self):
        """The JSON callback's report (read once the run ended)."""
        with self.output:
            self.output.seek(0)
            text = self.output.read()
        try:
            return json.loads(text)
        except ValueError:
            return {"text": text}

    def failures(self):
        """``[(task, message)]`` of every failed task (loop items included)."""
        found = []
        for play in self.report.get("plays", []):
            for task in play["tasks"]:
                for result in task["hosts"].values():
                    for item in [item for item in result.get("results", []) if item.get("failed")] or [result]:
                        if item.get("failed") or item.get("unreachable"):
                            found.append((task["task"]["name"], item.get("msg", "")))
        return found

    def changed(self):
        return sum(host.get("changed", 0) for host in self.report.get("stats", {}).values())

    def summary(self):
        return json.dumps(self.failures() or self.report, default=str)[-3000:]

    def changed_tasks(self):
        """``[(task, host, actions)]`` of every task that changed something."""
        return [(task["task"]["name"], host, actions_of(result))
                for play in self.report.get("plays", []) for task in play.get("tasks", [])
                for host, result in task["hosts"].items() if result.get("changed")]

    def assert_ok(self):
        assert self.rc == 0 and not self.failures(), self.summary()
        return self


# What a converge made, without what allocation picks at random ---------------------------------------------


def without(record, *keys):
    return {key: value for key, value in record.items() if key not in keys}


def network_names(vni):
    tag = "%x" % vni
    return {"bridge": "br-" + tag, "vxlan": "vx-" + tag, "lan_host": "vg-" + tag, "wan_host": "ve-" + tag,
            "namespace": "scnet-" + tag, "state_dir": "/run/smallcloud/networks/scnet-" + tag}


def in_ns(namespace, *argv):
    return subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, check=False)


def nft_comments(namespace):
    """``{chain: [rule comments, addresses masked]}`` of the network's ``table ip smallcloud``."""
    listing = in_ns(namespace, "nft", "-j", "list", "table", "ip", "smallcloud")
    if listing.returncode != 0:
        return None
    chains = {}
    for item in json.loads(listing.stdout)["nftables"]:
        if "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        if "rule" in item:
            chains[item["rule"]["chain"]].append(IPV4.sub("<ip>", item["rule"].get("comment", "")))
    return {chain: sorted(comments) for chain, comments in chains.items()}


def host_shape(network):
    """This network's objects on the host: links, namespace, NAT and floating rules, dnsmasq, addresses."""
    names = network_names(network["vni"])
    namespace = names["namespace"]
    present = Path("/run/netns", namespace).exists()
    wan = in_ns(namespace, "ip", "-4", "-o", "addr", "show", "dev", "wan").stdout if present else ""
    pid = Path(names["state_dir"], "dnsmasq.pid")
    return {
        "links": sorted(kind for kind in ("bridge", "vxlan", "lan_host", "wan_host")
                        if Path("/sys/class/net", names[kind]).exists()),
        "namespace": present,
        "nft": nft_comments(namespace) if present else None,
        "dnsmasq": pid.exists() and Path("/proc", pid.read_text().strip()).exists(),
        "wan_addresses": len(wan.splitlines()),
        "leases": len(Path(names["state_dir"], "hosts").read_text().splitlines())
        if Path(names["state_dir"], "hosts").exists() else None,
    }


def domain_states():
    """``{name: state}`` of this module's domains."""
    listing = subprocess.run([*VIRSH, "list", "--all", "--name"], capture_output=True, text=True, check=True)
    names = [name for name in listing.stdout.split() if name in INSTANCES]
    return {name: subprocess.run([*VIRSH, "domstate", name], capture_output=True, text=True,
                                 check=False).stdout.strip() for name in names}


def domain_nics(name):
    """``[(mac, bridge)]`` of a domain's persistent definition."""
    xml = subprocess.run([*VIRSH, "dumpxml", "--inactive", name], capture_output=True, text=True, check=True).stdout
    return re.findall(r"<mac address='([0-9a-f:]+)'/>\s*<source bridge='([^']+)'/>", xml)


def cloud_shape(cloud):
    """The converged cloud as two converges of the same declaration must agree on: records without their
    allocated values (VNI, addresses, MACs, UUIDs), allocations counted, domains, files and host objects."""
    records = cloud.records()
    networks = records.get("networks", {})
    instances = records.get("instances", {})
    shape = {
        "networks": {name: without(record, "vni", "egress_address") for name, record in networks.items()},
        "instances": {name: dict(without(record, "uuid", "seed", "interfaces", "bridges"),
                                 networks=[nic["network"] for nic in record["interfaces"]])
                      for name, record in instances.items()},
        "floating_ips": sorted((record["network"], record["instance"], record["pool"])
                               for record in records.get("floating_ips", {}).values()),
        "allocations": {folder: len(records.get(folder, {})) for folder in ALLOCATION_FOLDERS},
        "placements": sorted(key for key in records.get("placement", {}) if key.startswith("instances/")),
        "locks": sorted(records.get("locks", {})),
        "domains": domain_states(),
        "instance_files": {name: sorted(os.listdir(cloud.instances_dir / name))
                           for name in sorted(os.listdir(cloud.instances_dir))} if cloud.instances_dir.exists()
        else {},
        "cached_images": sorted(name.split(".", 1)[1] for name in os.listdir(cloud.cache_dir)
                                if not name.startswith(".")) if cloud.cache_dir.exists() else [],
        "host": {name: host_shape(record) for name, record in networks.items()},
    }
    # Each cloud has its own directories: the paths in its records differ only there.
    return json.loads(json.dumps(shape).replace(str(cloud.dir), "<cloud dir>"))


def check_allocations(cloud):
    """Every VNI, address and MAC held in etcd is named by the record of its owner, and no value is named
    twice (no leak, nothing given twice); each domain has the MACs and bridges its record names."""
    records = cloud.records()
    wanted = {}

    def named(key, owner):
        assert key not in wanted, "%s is named by %s and by %s" % (key, wanted[key], owner)
        wanted[key] = owner

    for name, network in records.get("networks", {}).items():
        named("vni/%d" % network["vni"], "network/" + name)
        if network.get("egress_address"):
            named("floating/%s/%s" % (pool_key(network["egress_pool"]), network["egress_address"]), "network/" + name)
    for name, instance in records.get("instances", {}).items():
        for nic in instance["interfaces"]:
            named("mac/" + nic["mac"], "instance/" + name)
            named("ipam/%s/%s" % (nic["network"], nic["ip"]), "instance/" + name)
        bridges = [network_names(records["networks"][nic["network"]]["vni"])["bridge"]
                   for nic in instance["interfaces"]]
        assert domain_nics(name) == [(nic["mac"], bridge) for nic, bridge in zip(instance["interfaces"], bridges)]
    for address, record in records.get("floating_ips", {}).items():
        named("floating/%s/%s" % (pool_key(record["pool"]), address),
              "floating_ip:%s/%s" % (record["network"], record.get("instance") or record["fixed_ip"]))
    held = {"%s/%s" % (folder, key): value["owner"] for folder in ALLOCATION_FOLDERS
            for key, value in records.get(folder, {}).items()}
    assert held == wanted, "allocations held %s, named by records %s" % (held, wanted)


def traces(cloud):
    """What is left of ``cloud`` anywhere: etcd keys (but a hypervisor's registration and event logs), domains,
    instance and cache files, and the links, namespaces and dnsmasq state of every VNI it ever held."""
    keys = sorted(key for key in cloud.keys()[0] if not key.startswith(KEPT_AFTER_TEARDOWN))
    host = []
    for vni in sorted(cloud.vnis):
        names = network_names(vni)
        host += [name for kind, name in names.items() if kind not in ("namespace", "state_dir")
                 and Path("/sys/class/net", name).exists()]
        host += [path for path in ("/run/netns/" + names["namespace"], names["state_dir"]) if Path(path).exists()]
        host += ["process %s" % pid for pid in processes_naming(names["state_dir"] + "/")]  # its dnsmasq
    files = [str(path) for folder in (cloud.instances_dir, cloud.cache_dir) if folder.exists()
             for path in folder.iterdir()]
    return {"keys": keys, "domains": sorted(domain_states()), "files": files, "host": host}


def processes_naming(text):
    """Pids of the processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace"):
                found.append(cmdline.parent.name)
        except OSError:
            continue  # gone meanwhile
    return found


def scrub(cloud):
    """Remove whatever a failed teardown left of ``cloud``: domains, namespaces, links, keys."""
    remove_domains()
    for vni in cloud.vnis:
        names = network_names(vni)
        for pid in processes_naming(names["state_dir"] + "/"):  # a dnsmasq of this cloud's network
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        delete_netns(names["namespace"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/run/netns/" + names["namespace"])  # a bare file, no mount
        for kind in ("wan_host", "lan_host", "vxlan", "bridge"):
            subprocess.run(["ip", "link", "del", names[kind]], capture_output=True, check=False)
        shutil.rmtree(names["state_dir"], ignore_errors=True)
    with contextlib.suppress(AssertionError):  # no member answers: the cluster went with its keys
        cloud.delete_keys()


@pytest.fixture
def cloud_on(site):
    """Factory: ``cloud_on(endpoints, label)`` makes a Cloud; each is torn down by the teardown playbook
    afterwards (and scrubbed when that fails), and nothing of it may be left."""
    clouds = []

    def make(endpoints, label):
        cloud = Cloud(site, endpoints, label)
        clouds.append(cloud)
        return cloud

    yield make
    for cloud in clouds:
        try:
            cloud.records()  # the VNIs to look for afterwards
            cloud.teardown().assert_ok()
            assert traces(cloud) == {"keys": [], "domains": [], "files": [], "host": []}
        finally:
            scrub(cloud)


@pytest.fixture(scope="module")
def clean_shape(site, etcd_server):
    """What one clean converge of the declaration makes (torn down again)."""
    cloud = Cloud(site, etcd_server.endpoints, "clean")
    try:
        cloud.converge().assert_ok()
        check_allocations(cloud)
        shape = cloud_shape(cloud)
        cloud.teardown().assert_ok()
        assert traces(cloud) == {"keys": [], "domains": [], "files": [], "host": []}
        return shape
    finally:
        scrub(cloud)


# Killing runs at points seen from outside ------------------------------------------------------------------


class Look:
    """The cloud seen from outside at one moment, each part read at most once; ``since`` is the etcd revision
    when the run started (a lock key created after it is the run's own)."""

    def __init__(self, cloud, since=None):
        self.cloud = cloud
        self.kvs, self.revision = cloud.keys()
        self.since = self.revision if since is None else since

    def has(self, key):
        return key in self.kvs

    def owned(self, folder, owner):
        """Keys of ``folder`` allocated to ``owner``."""
        return [key for key, (value, _revision) in self.kvs.items()
                if key.startswith(folder + "/") and isinstance(value, dict) and value.get("owner") == owner]

    def new_lock(self, name):
        """Lock ``name`` taken since the run started (a killed run's lock may still be there until its TTL)."""
        found = self.kvs.get("locks/" + name)
        return found is not None and found[1] > self.since

    @functools.cached_property
    def names(self):
        """The network's host object names, from its record or, before that, its VNI allocation."""
        record = self.kvs.get("networks/" + NET)
        if record is not None:
            return network_names(record[0]["vni"])
        vnis = self.owned("vni", "network/" + NET)
        return network_names(int(vnis[0].split("/")[1])) if vnis else None

    def link(self, kind):
        return self.names is not None and Path("/sys/class/net", self.names[kind]).exists()

    def namespace(self):
        return self.names is not None and Path("/run/netns", self.names["namespace"]).exists()

    def nft(self, *words):
        """Whether the namespace has ``table ip smallcloud`` (with a line holding every one of ``words``)."""
        if not self.namespace():
            return False
        listing = in_ns(self.names["namespace"], "nft", "list", "table", "ip", "smallcloud")
        return listing.returncode == 0 and (not words or any(all(word in line for word in words)
                                                             for line in listing.stdout.splitlines()))

    def dnsmasq(self):
        return self.names is not None and Path(self.names["state_dir"], "dnsmasq.pid").exists()

    def wan_addresses(self):
        if not self.namespace():
            return 0
        return len(in_ns(self.names["namespace"], "ip", "-4", "-o", "addr", "show", "dev", "wan").stdout.splitlines())

    def cache(self, suffix, larger_than=-1):
        """A file of the image cache named ``*suffix`` with more than ``larger_than`` bytes."""
        if not self.cloud.cache_dir.exists():
            return False
        return any(path.name.endswith(suffix) and path.stat().st_size > larger_than
                   for path in list(self.cloud.cache_dir.iterdir()) if path.exists())

    def instance_file(self, name, pattern):
        return any((self.cloud.instances_dir / name).glob(pattern))


def defined(name):
    """libvirt wrote the domain's persistent definition."""
    return Path("/etc/libvirt/qemu/%s.xml" % name).exists()


def running(name):
    """QEMU runs for the domain (libvirt keeps its pid file while it does)."""
    return Path("/run/libvirt/qemu/%s.pid" % name).exists()


@dataclasses.dataclass
class Point:
    """Where a run is killed: what it was doing, the step (module call) it runs, and when that shows."""

    name: str
    step: str
    holds: object  # Look -> bool


def instance_points(name, which):
    """The points of creating instance ``name`` (a subset of them, by ``which``), in the order they happen."""
    owner = "instance/" + name
    points = {
        "lock": Point(name + ": its lock taken", "instance", lambda look: look.new_lock(owner)),
        "mac": Point(name + ": MAC allocated", "instance", lambda look: look.owned("mac", owner)),
        "ip": Point(name + ": address allocated", "instance", lambda look: look.owned("ipam/" + NET, owner)),
        "root": Point(name + ": root overlay created", "instance",
                      lambda look: look.instance_file(name, "root.qcow2")),
        "seed": Point(name + ": seed written", "instance", lambda look: look.instance_file(name, "seed.iso")),
        "defined": Point(name + ": domain defined", "instance", lambda look: defined(name)),
        "recorded": Point(name + ": recorded", "instance", lambda look: look.has("instances/" + name)),
        "running": Point(name + ": domain running", "instance", lambda look: running(name)),
    }
    return [points[key] for key in which]


STAGES = {
    "image": [
        Point("image: download started", "image", lambda look: look.cache(".partial")),
        Point("image: download half way", "image", lambda look: look.cache(".partial", larger_than=64 << 10)),
    ],
    "network": [
        Point("network: its lock taken", "network", lambda look: look.new_lock("network/" + NET)),
        Point("network: the creation lock taken", "network", lambda look: look.new_lock("networks")),
        Point("network: VNI allocated", "network", lambda look: look.owned("vni", "network/" + NET)),
        Point("network: egress address allocated", "network",
              lambda look: look.owned("floating/" + pool_key(POOL), "network/" + NET)),
        Point("network: recorded", "network", lambda look: look.has("networks/" + NET)),
        Point("network: bridge created", "network", lambda look: look.link("bridge")),
        Point("network: gateway namespace created", "network", lambda look: look.namespace()),
        Point("network: LAN veth created", "network", lambda look: look.link("lan_host")),
        Point("network: NAT table written", "network", lambda look: look.nft()),
        Point("network: dnsmasq started", "network", lambda look: look.dnsmasq()),
    ],
    # Points an external look can tell apart: between lock, MAC and address there are only etcd requests, between
    # the others qemu-img, genisoimage, a definition or a QEMU start. (A kill lands a few ms after its point.)
    "instance": [
        *instance_points(INSTANCES[0], ["lock", "root", "seed", "defined", "running"]),
        *instance_points(INSTANCES[1], ["mac", "root", "seed", "defined", "running"]),
        *instance_points(INSTANCES[2], ["ip", "root", "seed", "recorded", "running"]),
    ],
    "floating_ip": [
        Point("floating IP: the network's lock taken", "floating_ip", lambda look: look.new_lock("network/" + NET)),
        Point("floating IP: address allocated", "floating_ip",
              lambda look: look.owned("floating/" + pool_key(POOL), "floating_ip:%s/%s" % (NET, FLOATING))),
        Point("floating IP: recorded", "floating_ip",
              lambda look: any(key.startswith("floating_ips/") for key in look.kvs)),
        Point("floating IP: DNAT rule added", "floating_ip", lambda look: look.nft("dnat to")),
        Point("floating IP: address on the egress link", "floating_ip", lambda look: look.wan_addresses() > 1),
    ],
}


def killed_at(cloud, point, timeout=120):
    """Run ``point``'s step and SIGKILL it (and all it started) as soon as the point shows.

    None when the point already showed before the run (an earlier kill came after it); else the Run,
    whose ``killed`` says whether the point was reached before the run ended.
    """
    start = Look(cloud)
    if point.holds(start):
        return None
    run = cloud.start(cloud.step_play(point.step))
    deadline = time.monotonic() + timeout
    while run.process.poll() is None and time.monotonic() < deadline:
        if point.holds(Look(cloud, since=start.revision)):
            run.killed = point.name
            break
        time.sleep(0.005)
    run.kill()
    return run


def test_runs_killed_at_many_points_then_a_rerun_converges(cloud_on, etcd_server, clean_shape):
    cloud = cloud_on(etcd_server.endpoints, "killed")
    killed, skipped = [], []
    for step, points in STAGES.items():
        for point in points:
            run = killed_at(cloud, point)
            if run is None or not run.killed:  # an earlier kill came later than this point, or it went by unseen
                assert run is None or run.rc == 0, run.summary()
                skipped.append(point.name)
                continue
            killed.append(point.name)
        if step != "floating_ip":  # (the floating IPs' re-run is the role's converge below)
            # The step itself again, before the next step's kills: it converges what its killed runs left.
            cloud.step(step).assert_ok()
            check_allocations(cloud)
    assert len(killed) >= 20, "killed at %s; skipped %s" % (killed, skipped)
    cloud.converge().assert_ok()
    check_allocations(cloud)
    assert cloud_shape(cloud) == clean_shape
    again = cloud.converge().assert_ok()
    assert again.changed() == 0, again.changed_tasks()


# Daemons failing under a batch of instances ----------------------------------------------------------------


def converge_with_fault_after_first_instance(cloud, fault):
    """Start the role's converge, and call ``fault()`` once the batch, done with its first instance, has begun
    the second (the third still to come); the finished Run."""
    run = cloud.start(None, cloud.variables(), playbook=cloud.site.play)
    second = "instance/" + INSTANCES[1]
    try:
        wait_for(lambda: run.process.poll() is not None or Look(cloud).owned("mac", second), 300, interval=0.02,
                 what="the second instance of the batch begun")
        assert run.process.poll() is None, "the converge ended before its batch was half done: %s" % run.summary()
        fault()
        return run.wait()
    finally:
        run.kill()


def assert_failed_naming(run, *words):
    """A run that failed did so with a message naming one of ``words`` (which part failed), not a traceback."""
    if run.rc == 0:
        return
    messages = [message for _task, message in run.failures()]
    assert messages and all(any(word in message for word in words) for message in messages), run.summary()
    assert not any("Traceback" in message or "MODULE FAILURE" in message for message in messages), run.summary()


def test_a_converge_killed_half_way_then_the_teardown_leaves_nothing(cloud_on, etcd_server):
    """Instances placed but never created (the run died first) are removed by the teardown too: no placement and
    no reservation is left in etcd (the fixture checks every trace after its own teardown as well)."""
    cloud = cloud_on(etcd_server.endpoints, "halfway")
    run = cloud.start(None, cloud.variables(), playbook=cloud.site.play)
    try:
        wait_for(lambda: run.process.poll() is not None or Look(cloud).owned("mac", "instance/" + INSTANCES[1]), 300,
                 interval=0.02, what="the second instance of the batch begun")
    finally:
        run.kill()
    look = Look(cloud)
    assert look.has("placement/instances/" + INSTANCES[2]) and not look.has("instances/" + INSTANCES[2])
    cloud.teardown().assert_ok()
    assert traces(cloud) == {"keys": [], "domains": [], "files": [], "host": []}


@pytest.fixture
def own_libvirtd(libvirtd):
    """The tests' own libvirtd, which a test may restart (skipped when the one that answers is someone else's)."""
    if not libvirtd.restartable:
        pytest.skip("libvirtd runs but the tests did not start it: restarting it would break whoever did")
    return libvirtd


def test_libvirtd_restarted_in_the_middle_of_a_batch_then_a_rerun_converges(own_libvirtd, cloud_on, etcd_server,
                                                                            clean_shape):
    cloud = cloud_on(etcd_server.endpoints, "libvirtd")
    run = converge_with_fault_after_first_instance(cloud, own_libvirtd.restart)
    assert_failed_naming(run, "libvirt")
    cloud.converge().assert_ok()
    check_allocations(cloud)
    assert cloud_shape(cloud) == clean_shape


def etcd_leader(cluster):
    """The member that leads ``cluster`` now (from each member's maintenance status)."""
    for member in cluster.members:
        status = etcd_request(member.client_url, "maintenance/status", {})
        if status.get("leader") == status["header"]["member_id"]:
            return member
    raise AssertionError("no member of %s says it leads" % cluster.endpoints)


def test_etcd_leader_killed_in_the_middle_of_a_batch_then_a_rerun_converges(etcd_cluster, cloud_on, clean_shape):
    cluster = etcd_cluster(3)
    cloud = cloud_on(cluster.endpoints, "etcd")  # every module gets all three endpoints

    def kill_leader():
        leader = etcd_leader(cluster)
        leader.process.kill()
        leader.process.wait()

    run = converge_with_fault_after_first_instance(cloud, kill_leader)
    assert_failed_naming(run, "etcd", "lock")
    cloud.converge().assert_ok()  # on the two members left
    check_allocations(cloud)
    assert cloud_shape(cloud) == clean_shape


# The image cache's file system full ------------------------------------------------------------------------


@pytest.fixture
def small_cache(site):
    """An image cache on a 1 MiB tmpfs of its own; unmounted afterwards, whatever happened."""
    path = site.work / "small-cache"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "smallcloud-test-cache", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_image_cache_fails_clearly_leaves_no_partial_entry_and_works_once_there_is_room(
        site, small_cache, http_server, ansible):
    served = http_server(site.work / "served")  # at full speed: the 3 MiB image is what fills the cache
    image = {"url": served.url("big.qcow2"), "checksum": site.big_image["checksum"], "cache_dir": str(small_cache)}
    full = ansible.run_module("image", image)
    assert full.get("failed"), full
    assert str(small_cache) in full["msg"] and "No space left on device" in full["msg"], full["msg"]
    assert os.listdir(small_cache) == []  # no partial download, metadata or lock file left
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_cache)], check=True)
    fetched = ansible.run_module("image", image)
    assert fetched["changed"] and not fetched.get("failed"), fetched.get("msg")
    assert sha256(fetched["path"]) == site.big_image["checksum"]
    assert sorted(os.listdir(small_cache)) == sorted([Path(fetched["path"]).name, Path(fetched["path"]).name + ".json"])


# Eight controllers at once ---------------------------------------------------------------------------------


def test_eight_controllers_converging_at_once_make_the_cloud_one_controller_makes(cloud_on, etcd_server,
                                                                                  clean_shape):
    cloud = cloud_on(etcd_server.endpoints, "eight")
    runs = [cloud.start(None, cloud.variables(), playbook=cloud.site.play) for _controller in range(8)]
    try:
        for run in runs:
            run.wait().assert_ok()
    finally:
        for run in runs:
            run.kill()
    check_allocations(cloud)  # no address, MAC or VNI given twice, none leaked
    assert cloud_shape(cloud) == clean_shape  # no domain twice, the same records and host objects
