# -*- coding: utf-8 -*-
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``instance`` module: validate every instance, observe, plan, apply.

One call converges one instance (``name``) or many (``instances``), over one libvirt connection and
one etcd listing of ``instances/``. Per instance, on the host::

    <instances_dir>/NAME/root.qcow2          overlay on the cached image (grown to disk_size)
    <instances_dir>/NAME/ephemeral-N.qcow2   fresh empty disks
    <instances_dir>/NAME/seed.iso            cloud-init NoCloud seed (label cidata)
    <instances_dir>/NAME/console.log         serial console, written by virtlogd

and in etcd ``instances/NAME`` = {"name", "interfaces": [{"network", "mac", "ip"}], "host", "uuid", "state",
"image", "cpus", "memory", "disks", "bridges", "hostname", "seed", "console_log", ...}, with MAC and IP
allocations owned by ``instance/NAME``. Everything is validated before the first change; a failed
creation undoes what it did. A re-run with nothing to change runs no command and no etcd request beyond
the one listing.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import ipaddress
import os
import re
import shutil
import socket
import time
import uuid

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import disks as disk_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import images
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import networks as net_utils
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import seed as seed_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, LIBVIRT_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import (
    Conflict,
    HostError,
    InvalidInput,
    MissingLibrary,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

try:
    import libvirt

    HAS_LIBVIRT = True
except ImportError:  # pragma: no cover - depends on the managed host
    HAS_LIBVIRT = False

try:
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
except ImportError:  # pragma: no cover - ansible-core < 2.11
    ArgumentSpecValidator = None

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CPUS_MAX = 255
MEMORY_MIN = 32  # MiB: the tiny guest needs about this much
STATES = ("running", "stopped", "absent")
NOT_YET = "(allocated on apply)"
UNDEFINE_FLAGS = ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
                  "VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA")

# Per-instance options: top-level values are the defaults of every entry of ``instances``.
INSTANCE_OPTIONS = dict(
    name=dict(type="str"),
    image=dict(type="str"),
    image_checksum=dict(type="str"),
    cpus=dict(type="int"),
    memory=dict(type="int"),
    disk_size=dict(type="str"),
    ephemeral_disks=dict(type="list", elements="str"),
    networks=dict(type="list", elements="raw"),
    ssh_keys=dict(type="list", elements="str", no_log=False),
    user_data=dict(type="str"),
    hostname=dict(type="str"),
    state=dict(type="str", choices=list(STATES)),
    virt_type=dict(type="str", choices=["auto", "kvm", "qemu"]),
    shutdown_timeout=dict(type="int"),
    autostart=dict(type="bool"),
)
DEFAULTS = dict(cpus=1, memory=512, ephemeral_disks=[], networks=[], ssh_keys=[], state="running",
                virt_type="auto", shutdown_timeout=60, autostart=False)

INSTANCE_ARGS = with_common(
    dict(
        [(key, dict(spec, default=DEFAULTS[key]) if key in DEFAULTS else spec)
         for key, spec in INSTANCE_OPTIONS.items()],
        instances=dict(type="list", elements="dict"),
        detected_virt_type=dict(type="str", choices=["kvm", "qemu"]),
        instances_dir=dict(type="path", default="/var/lib/smallcloud/instances"),
        image_cache_dir=dict(type="path", default="/var/lib/smallcloud/images"),
        network_state_dir=dict(type="path", default="/run/smallcloud/networks"),
        namespace_prefix=dict(type="str", default="scnet-"),
        sysfs_root=dict(type="path", default="/sys"),
    ),
    ETCD_ARGS,
    LIBVIRT_ARGS,
)
INSTANCE_ARGS_RULES = dict(mutually_exclusive=[["name", "instances"]], required_one_of=[["name", "instances"]])


# validation (pure) -----------------------------------------------------------------------------


def check_name(name):
    """``name`` if libvirt, etcd and the file system all accept it, else InvalidInput."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            "instance name %r is not allowed: use 1-63 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit" % (name,), name=name, allowed=NAME_RE.pattern)
    return name


def parse_networks(entries, name):
    """``[(network, ip or None)]`` from names or ``{name, ip}`` dicts; InvalidInput naming a bad entry."""
    parsed = []
    for item in entries or []:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or set(entry) - set(["name", "ip"]) or not entry.get("name"):
            raise InvalidInput("instance %s: networks entry %r is not a network name or {name: NET, ip: ADDRESS}"
                               % (name, entry), network=entry)
        net_utils.check_name(entry["name"])
        address = entry.get("ip")
        if address is not None:
            address = str(net_utils.parse_address(address, "ip"))
        parsed.append((entry["name"], address))
    names = [network for network, _ip in parsed]
    duplicates = sorted(set(n for n in names if names.count(n) > 1))
    if duplicates:
        raise InvalidInput("instance %s: network %s is listed more than once" % (name, duplicates[0]),
                           network=duplicates[0])
    return parsed


def resolve_virt_type(virt_type, detected):
    """``kvm`` or ``qemu``: the one asked for, else the detected one, else qemu (TCG works everywhere)."""
    if virt_type in dom_xml.VIRT_TYPES:
        return virt_type
    return detected if detected in dom_xml.VIRT_TYPES else "qemu"


def image_url(image):
    """``(url, None)`` for a URL or absolute path, ``(None, name)`` for a catalog shorthand."""
    if "://" in image:
        return image, None
    if image.startswith("/"):
        return "file://" + image, None
    return None, image


def expand(params):
    """The validated desired state of every instance: a list of dicts (top-level options as defaults)."""
    entries = params["instances"] if params.get("instances") is not None else [{"name": params["name"]}]
    wanted = []
    for index, entry in enumerate(entries):
        merged = dict((key, params.get(key)) for key in INSTANCE_OPTIONS)
        merged.update(_validated_entry(entry, index))
        wanted.append(desired_instance(merged, params.get("detected_virt_type")))
    check_batch(wanted)
    return wanted


def _validated_entry(entry, index):
    """One entry of ``instances`` type-checked against INSTANCE_OPTIONS; only the keys it sets."""
    if not isinstance(entry, dict):
        raise InvalidInput("instances[%d] is not a dict: %r" % (index, entry), entry=entry)
    unknown = sorted(set(entry) - set(INSTANCE_OPTIONS))
    if unknown:
        raise InvalidInput("instances[%d] has unknown keys %s; allowed: %s"
                           % (index, ", ".join(unknown), ", ".join(sorted(INSTANCE_OPTIONS))), keys=unknown)
    if ArgumentSpecValidator is None:
        return dict(entry)
    result = ArgumentSpecValidator(INSTANCE_OPTIONS).validate(dict(entry))
    if result.error_messages:
        raise InvalidInput("instances[%d] (%s): %s" % (index, entry.get("name"), "; ".join(result.error_messages)),
                           entry=entry.get("name"))
    return dict((key, value) for key, value in result.validated_parameters.items() if key in entry)


def desired_instance(opts, detected_virt_type):
    """Check one instance's options and return its normalised desired state."""
    name = check_name(opts.get("name"))
    state = opts.get("state") or "running"
    want = {"name": name, "state": state, "shutdown_timeout": opts.get("shutdown_timeout")}
    if want["shutdown_timeout"] is None or want["shutdown_timeout"] < 0:
        raise InvalidInput("instance %s: shutdown_timeout %r must be >= 0 seconds" % (name, opts.get(
            "shutdown_timeout")), shutdown_timeout=opts.get("shutdown_timeout"))
    if state == "absent":
        return want
    cpus, memory = opts.get("cpus"), opts.get("memory")
    if cpus is None or not 1 <= cpus <= CPUS_MAX:
        raise InvalidInput("instance %s: cpus %r is out of range: allowed 1..%d" % (name, cpus, CPUS_MAX),
                           cpus=cpus, allowed="1..%d" % CPUS_MAX)
    if memory is None or memory < MEMORY_MIN:
        raise InvalidInput("instance %s: memory %r MiB is out of range: at least %d MiB" % (name, memory, MEMORY_MIN),
                           memory=memory, allowed=">= %d" % MEMORY_MIN)
    if not opts.get("image"):
        raise InvalidInput("instance %s: image is required unless state is absent" % name, name=name)
    hostname = opts.get("hostname") or seed_ops.hostname_for(name)
    want.update(
        image=opts["image"], image_checksum=opts.get("image_checksum"), cpus=cpus, memory=memory,
        disk_size=disk_ops.parse_size(opts["disk_size"]) if opts.get("disk_size") else None,
        ephemeral_disks=[disk_ops.parse_size(size, "ephemeral_disks") for size in opts.get("ephemeral_disks") or []],
        networks=parse_networks(opts.get("networks"), name),
        ssh_keys=seed_ops.check_ssh_keys(opts.get("ssh_keys")),
        user_data=seed_ops.check_user_data(opts.get("user_data")),
        hostname=seed_ops.check_hostname(hostname),
        virt_type=resolve_virt_type(opts.get("virt_type"), detected_virt_type),
        autostart=bool(opts.get("autostart")),
    )
    return want


def check_batch(wanted):
    """Refuse a batch naming one instance twice or giving one fixed IP to two interfaces."""
    seen, fixed = set(), {}
    for want in wanted:
        if want["name"] in seen:
            raise InvalidInput("instance %s is listed more than once" % want["name"], name=want["name"])
        seen.add(want["name"])
        for network, address in want.get("networks") or []:
            if address is None:
                continue
            other = fixed.get((network, address))
            if other is not None:
                raise InvalidInput("ip %s on network %s is requested by both %s and %s"
                                   % (address, network, other, want["name"]), ip=address, network=network)
            fixed[(network, address)] = want["name"]


# the host and the store, shared by every instance of one call ----------------------------------


class Context(object):
    """One libvirt connection, one Store, and what the batch read once (records, networks, host facts)."""

    def __init__(self, module, store, conn):
        self.module = module
        self.params = module.params
        self.check_mode = module.check_mode
        self.store = store
        self.conn = conn
        self.host = socket.gethostname()
        self.records = net_utils.top_records(store.list("instances"))
        self.domains = dict((domain.name(), domain) for domain in conn.listAllDomains(0))
        self._networks = None
        self._host_memory = None
        self._images = {}

    def networks(self):
        """The ``networks/`` records, read once when first needed."""
        if self._networks is None:
            self._networks = net_utils.top_records(self.store.list("networks"))
        return self._networks

    def host_memory(self):
        """The host's memory in MiB (libvirt's node info), read once."""
        if self._host_memory is None:
            self._host_memory = int(self.conn.getInfo()[1])
        return self._host_memory

    def image(self, want, check_mode):
        """The cached image for ``want``: ``{"path", "format", "virtual_size", "changed"}`` (fetched if missing)."""
        url, name = image_url(want["image"])
        key = (url, name, want.get("image_checksum"), check_mode)
        if key not in self._images:
            result = images.ensure_cached(check_mode, url=url, name=name, checksum=want.get("image_checksum"),
                                          cache_dir=self.params["image_cache_dir"])
            for warning in result["warnings"]:
                self.module.warn(warning)
            self._images[key] = {"path": result["path"], "format": result["format"],
                                 "virtual_size": result.get("virtual_size"), "changed": result.get("changed")}
        return self._images[key]

    def refresh_leases(self, network_names):
        """Have each network's dnsmasq that runs on this host serve the current instance records."""
        listing = None
        for network in sorted(set(network_names)):
            record = self.networks().get(network) or self.store.get("networks/%s" % network)
            if not record:
                continue
            if listing is None:
                listing = net_utils.top_records(self.store.list("instances"))
            net_utils.refresh_leases(network, record, listing, self.params["network_state_dir"],
                                     self.params["namespace_prefix"])


def open_libvirt(uri):
    """A libvirt connection to ``uri``; HostError naming it when libvirtd does not answer."""
    if not HAS_LIBVIRT:
        raise MissingLibrary("the libvirt Python bindings are required on the managed host (Debian: python3-libvirt)",
                             library="libvirt")
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise HostError("cannot connect to libvirt at %s: %s" % (uri, error), uri=uri) from error


@contextlib.contextmanager
def host_errors(name):
    """Turn a libvirt or file system error while changing instance ``name`` into HostError naming it."""
    try:
        yield
    except OSError as error:
        raise HostError("instance %s: %s" % (name, error), name=name, path=getattr(error, "filename", None)) from error
    except Exception as error:
        if HAS_LIBVIRT and isinstance(error, libvirt.libvirtError):
            raise HostError("instance %s: libvirt refused: %s" % (name, error), name=name) from error
        raise


def undefine_flags():
    """Flags that let undefine succeed with managed save, snapshots, NVRAM or checkpoints present."""
    flags = 0
    for name in UNDEFINE_FLAGS:
        flags |= getattr(libvirt, name, 0)
    return flags


# converge --------------------------------------------------------------------------------------


def converge(module):
    """Entry point for run_module: every instance validated, observed, planned, then applied."""
    wanted = expand(module.params)
    store = Store.from_params(module.params)
    conn = open_libvirt(module.params["uri"])
    try:
        context = Context(module, store, conn)
        runners = [InstanceRunner(context, want) for want in wanted]
        for runner in runners:
            runner.prepare()
        if not context.check_mode:
            # Every guest this batch stops is asked at once, after the whole batch validated, so their
            # shutdown waits overlap: N guests that ignore ACPI cost one shutdown_timeout, not N.
            for runner in runners:
                runner.request_shutdown()
        results = [runner.converge() for runner in runners]
    finally:
        conn.close()
    return batch_result(module.params, runners, results)


def batch_result(params, runners, results):
    """The task result: per-instance results, plus the single instance's keys at the top for ``name``."""
    if params.get("instances") is None:
        result = runners[0].plan.result(**results[0])
        result["instances"] = results
        return result
    return {
        "changed": any(runner.plan.changed for runner in runners),
        "diff": {"before": dict((r.name, r.plan.before) for r in runners),
                 "after": dict((r.name, r.plan.after) for r in runners)},
        "actions": ["%s: %s" % (r.name, action) for r in runners for action in r.plan.actions],
        "instances": results,
    }


class InstanceRunner(object):
    """Observe, validate and plan one instance in ``prepare``; apply in ``converge``."""

    def __init__(self, context, want):
        self.ctx = context
        self.want = want
        self.name = want["name"]
        self.owner = "instance/%s" % self.name
        self.path = "instances/%s" % self.name
        self.dir = os.path.join(context.params["instances_dir"], self.name)
        self.plan = Plan()
        self.record = context.records.get(self.name)
        self.domain = context.domains.get(self.name)
        self.needs_restart = False
        self.creating = False
        self.undo = []
        self.stopping = False
        self.shutdown_deadline = None

    # paths -------------------------------------------------------------------------------------

    def file(self, name):
        return os.path.join(self.dir, name)

    def ephemeral_path(self, index):
        return self.file("ephemeral-%d.qcow2" % index)

    # observe -----------------------------------------------------------------------------------

    def observe(self):
        """The domain's normalised definition, live definition, state and autostart (None when undefined)."""
        if self.domain is None:
            return None
        inactive = dom_xml.observe(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        active = bool(self.domain.isActive())
        return {
            "definition": inactive,
            "live": dom_xml.observe(self.domain.XMLDesc(0)) if active else None,
            "state": "running" if active else "stopped",
            "autostart": bool(self.domain.autostart()),
        }

    def prepare(self):
        """Validate against the store and the host and plan every step; nothing is changed here."""
        self.seen = self.observe()
        elsewhere = (self.record or {}).get("host")
        if self.domain is None and elsewhere not in (None, self.ctx.host):
            raise Conflict("instance %s is recorded on host %s; converge it there" % (self.name, elsewhere),
                           name=self.name, host=elsewhere)
        if self.seen is not None and not self.seen["definition"]["managed"] and self.record is None:
            raise Conflict("a domain named %s exists but was not made by smallcloud; choose another name" % self.name,
                           name=self.name)
        if self.want["state"] == "absent":
            return self.plan_absent()
        if self.domain is None or not os.path.exists(self.file("root.qcow2")):
            if self.domain is not None:
                raise HostError("instance %s is defined but its root disk %s is missing; remove it with state=absent"
                                % (self.name, self.file("root.qcow2")), name=self.name)
            return self.plan_create()
        return self.plan_update()

    # create ------------------------------------------------------------------------------------

    def interfaces_plan(self, current):
        """``(kept, added, removed)`` interfaces: records ``{network, mac, ip}`` compared with the wanted networks."""
        by_network = dict((nic["network"], nic) for nic in current)
        kept, added = [], []
        for network, address in self.want["networks"]:
            nic = by_network.get(network)
            if nic is not None and nic.get("ip") and (address is None or address == nic["ip"]):
                kept.append(nic)
            else:
                added.append({"network": network, "mac": nic["mac"] if nic else None, "ip": address,
                              "old_ip": nic.get("ip") if nic else None})
        wanted_names = set(network for network, _ip in self.want["networks"])
        removed = [nic for nic in current if nic["network"] not in wanted_names]
        return kept, added, removed

    def check_networks(self, added):
        """Each new interface's network exists, its bridge is on this host, and a fixed IP is free and in range."""
        for nic in added:
            record = self.ctx.networks().get(nic["network"])
            if not record or record.get("vni") is None:
                known = sorted(self.ctx.networks())
                raise InvalidInput("instance %s: network %s does not exist (known: %s)"
                                   % (self.name, nic["network"], ", ".join(known) or "none"), network=nic["network"])
            bridge = net_utils.device_names(record["vni"], self.ctx.params["namespace_prefix"])["bridge"]
            if not os.path.isdir(os.path.join(self.ctx.params["sysfs_root"], "class", "net", bridge, "bridge")):
                raise HostError("instance %s: network %s has no bridge %s on this host; converge the network here first"
                                % (self.name, nic["network"], bridge), network=nic["network"], bridge=bridge)
            if nic["ip"] is not None:
                self.check_fixed_ip(nic["network"], record["cidr"], nic["ip"])

    def check_fixed_ip(self, network, cidr, address):
        """A fixed IP must be a guest address of the network and not taken by another owner."""
        net = ipaddress.ip_network(u"%s" % cidr)
        ip = ipaddress.ip_address(u"%s" % address)
        if ip not in net or ip in (net.network_address, net.network_address + 1, net.broadcast_address):
            raise InvalidInput("instance %s: ip %s is not a guest address of network %s (%s; allowed %s..%s)"
                               % (self.name, address, network, cidr, net.network_address + 2,
                                  net.broadcast_address - 1), ip=address, network=network)
        taken = self.ctx.store.get("ipam/%s/%s" % (network, address))
        owner = taken.get("owner") if isinstance(taken, dict) else taken
        if taken is not None and owner != self.owner:
            raise Conflict("instance %s: ip %s on network %s is taken by %s" % (self.name, address, network, owner),
                           ip=address, network=network, owner=owner)

    def check_host(self):
        """Memory within what the host has."""
        if self.want["memory"] > self.ctx.host_memory():
            raise InvalidInput("instance %s: memory %d MiB is out of range: this host has %d MiB"
                               % (self.name, self.want["memory"], self.ctx.host_memory()),
                               memory=self.want["memory"], allowed="%d..%d" % (MEMORY_MIN, self.ctx.host_memory()))

    def plan_create(self):
        """Validate a new instance and queue its creation (one step that undoes itself on failure)."""
        self.creating = True
        self.check_host()
        # A record without its domain (e.g. undefined by hand) keeps its MACs and IPs.
        current = list((self.record or {}).get("interfaces") or [])
        kept, added, removed = self.interfaces_plan(current)
        self.check_networks(added)
        image = self.ctx.image(self.want, self.ctx.check_mode)
        size = self.want["disk_size"]
        if size is not None and image["virtual_size"] and size < image["virtual_size"]:
            raise InvalidInput("instance %s: disk_size %s is smaller than image %s (%s); disks are never shrunk"
                               % (self.name, disk_ops.human(size), self.want["image"],
                                  disk_ops.human(image["virtual_size"])), disk_size=size,
                               image_size=image["virtual_size"])
        self.image_info = image
        self.kept_nics, self.new_nics, self.removed_nics = kept, added, removed
        self.plan.compare("state", "absent", self.want["state"])
        self.plan.compare("definition", None, self.summary_desired(added))
        self.plan.compare("interfaces", [self.nic_view(nic) for nic in current],
                          [self.nic_view(nic) for nic in kept + added])
        for nic in removed:
            self.plan.add("release %s and %s on network %s" % (nic.get("mac"), nic.get("ip"), nic["network"]))
        for nic in added:
            self.plan.add("allocate MAC and %s on network %s" % (nic["ip"] or "an IP", nic["network"]))
        sized = " (%s)" % disk_ops.human(size) if size else ""
        self.plan.add("create root disk %s on %s%s" % (self.file("root.qcow2"), image["path"], sized))
        for index, eph in enumerate(self.want["ephemeral_disks"]):
            self.plan.add("create ephemeral disk %s (%s)" % (self.ephemeral_path(index), disk_ops.human(eph)))
        self.plan.add("write seed %s" % self.file("seed.iso"))
        self.plan.add("define domain %s (%d vCPU, %d MiB, %s)" % (self.name, self.want["cpus"], self.want["memory"],
                                                                  self.want["virt_type"]))
        if self.want["state"] == "running":
            self.plan.add("start domain %s" % self.name)
        self.plan.add("record etcd %s" % self.path, self.create)

    def create(self):
        """Allocate, create disks and seed, define and record the instance; undo everything on failure."""
        try:
            with self.ctx.store.lock(self.owner, ttl=60, timeout=120):
                with host_errors(self.name):
                    self._create()
        except BaseException:
            self.rollback()
            raise

    def _create(self):
        """The creation steps, each registering its undo."""
        stored = self.ctx.store.get(self.path)
        if stored is not None and stored != self.record:
            raise Conflict("instance %s was changed by someone else meanwhile" % self.name, name=self.name)
        self.uuid = (self.record or {}).get("uuid") or str(uuid.uuid4())
        nics = [dict(nic) for nic in self.kept_nics] + [self.allocate(nic) for nic in self.new_nics]
        order = [network for network, _ip in self.want["networks"]]
        nics.sort(key=lambda nic: order.index(nic["network"]))
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, 0o755)
            self.undo.append(lambda: shutil.rmtree(self.dir, ignore_errors=True))
        self.create_disks()
        self.write_seed(nics)
        spec = self.spec(nics)
        self.domain = self.ctx.conn.defineXML(dom_xml.build_xml(spec))
        self.undo.append(self.undefine)
        if self.want["autostart"]:
            self.domain.setAutostart(1)
        record = self.record_for(nics, self.want["state"])
        if stored is not None:
            self.ctx.store.put(self.path, record)
            self.undo.append(lambda: self.ctx.store.put(self.path, stored))
        elif self.ctx.store.create(self.path, record):
            self.undo.append(lambda: self.ctx.store.delete(self.path))
        else:
            raise Conflict("instance %s was recorded by someone else meanwhile" % self.name, name=self.name)
        for nic in self.removed_nics:
            self.release(nic)
        self.record = record
        self.ctx.refresh_leases([nic["network"] for nic in nics])
        if self.want["state"] == "running":
            self.start()
        self.undo = []
        self.ctx.store.log_event("instance", self.name, "created on %s" % self.ctx.host)

    def allocate(self, nic):
        """MAC and IP for a new interface, recorded for this instance (released again on rollback)."""
        record = self.ctx.networks()[nic["network"]]
        mac = self.ctx.store.allocate_mac(self.owner, requested=nic.get("mac"))
        if not nic.get("mac"):
            self.undo.append(lambda: self.ctx.store.release_mac(mac, owner=self.owner))
        ip = self.ctx.store.allocate_ip(nic["network"], record["cidr"], self.owner, requested=nic["ip"])
        self.undo.append(lambda: self.ctx.store.release_ip(nic["network"], ip, owner=self.owner))
        return {"network": nic["network"], "mac": mac, "ip": ip}

    def create_disks(self):
        """Root overlay on the cached image (at disk_size) and the fresh ephemeral disks."""
        root = self.file("root.qcow2")
        self.undo.append(lambda: disk_ops.remove(root))
        disk_ops.create_overlay(root, self.image_info["path"], self.image_info["format"], self.want["disk_size"])
        for index, size in enumerate(self.want["ephemeral_disks"]):
            path = self.ephemeral_path(index)
            self.undo.append(lambda p=path: disk_ops.remove(p))
            disk_ops.create_blank(path, size)

    def rollback(self):
        """Undo the steps of a failed creation, newest first; the original error is what the task reports."""
        while self.undo:
            step = self.undo.pop()
            try:
                step()
            except Exception:  # noqa: S110 - keep undoing: the first error is the one the task reports
                pass

    # the desired definition ----------------------------------------------------------------------

    def bridge(self, network):
        """The bridge of ``network``: from the record, else derived from the network's VNI."""
        bridges = (self.record or {}).get("bridges") or {}
        if network in bridges:
            return bridges[network]
        record = self.ctx.networks()[network]
        return net_utils.device_names(record["vni"], self.ctx.params["namespace_prefix"])["bridge"]

    def disks(self):
        """The disk list of the definition: root, ephemerals, seed cdrom."""
        count = 1 + len(self.want["ephemeral_disks"])
        targets = dom_xml.disk_targets(count)
        out = [{"device": "disk", "target": targets[0], "bus": dom_xml.DISK_BUS, "path": self.file("root.qcow2"),
                "format": "qcow2"}]
        for index in range(len(self.want["ephemeral_disks"])):
            out.append({"device": "disk", "target": targets[index + 1], "bus": dom_xml.DISK_BUS,
                        "path": self.ephemeral_path(index), "format": "qcow2"})
        out.append({"device": "cdrom", "target": "sda", "bus": dom_xml.SEED_BUS, "path": self.file("seed.iso"),
                    "format": "raw"})
        return out

    def spec(self, nics):
        """The domain spec for ``nics``."""
        return {
            "name": self.name, "uuid": self.uuid, "virt_type": self.want["virt_type"], "cpus": self.want["cpus"],
            "memory": self.want["memory"], "disks": self.disks(),
            "nics": [{"mac": nic["mac"], "bridge": self.bridge(nic["network"]), "model": dom_xml.NIC_MODEL}
                     for nic in nics],
            "console_log": self.file("console.log"),
        }

    def seed_files(self, nics):
        return seed_ops.seed_files(self.uuid, self.want["hostname"], self.want["ssh_keys"], self.want["user_data"],
                                   [nic["mac"] for nic in nics])

    def write_seed(self, nics):
        """Write the seed ISO for ``nics``; keep its digest for the record."""
        files = self.seed_files(nics)
        self.seed_digest = seed_ops.digest(files)
        seed_ops.write_iso(self.file("seed.iso"), files)

    def record_for(self, nics, state):
        """The etcd record of this instance."""
        return {
            "name": self.name,
            "interfaces": [{"network": nic["network"], "mac": nic["mac"], "ip": nic["ip"]} for nic in nics],
            "host": self.ctx.host, "uuid": self.uuid, "state": state, "image": self.want["image"],
            "cpus": self.want["cpus"], "memory": self.want["memory"], "virt_type": self.want["virt_type"],
            "disk_size": self.want["disk_size"], "ephemeral_disks": self.want["ephemeral_disks"],
            "disks": [disk["path"] for disk in self.disks()],
            "bridges": dict((nic["network"], self.bridge(nic["network"])) for nic in nics),
            "hostname": self.want["hostname"], "seed": self.seed_digest, "console_log": self.file("console.log"),
            "autostart": self.want["autostart"],
        }

    def nic_view(self, nic):
        return {"network": nic["network"], "mac": nic.get("mac") or NOT_YET, "ip": nic.get("ip") or NOT_YET}

    def summary_desired(self, nics):
        """The managed fields the definition will have (for the diff of a new instance)."""
        return {"virt_type": self.want["virt_type"], "cpus": self.want["cpus"], "memory": self.want["memory"],
                "disks": self.disks(), "autostart": self.want["autostart"], "hostname": self.want["hostname"]}

    # update ------------------------------------------------------------------------------------

    def plan_update(self):
        """Compare an existing instance field by field and queue what differs."""
        self.uuid = self.seen["definition"]["uuid"]
        current = list((self.record or {}).get("interfaces") or [])
        if self.record is None:
            current = self.adopt_interfaces()
        kept, added, removed = self.interfaces_plan(current)
        if added:
            self.check_networks(added)
        if self.want["memory"] != self.seen["definition"]["memory"]:
            self.check_host()
        self.plan_disks()
        nics = self.plan_interfaces(current, kept, added, removed)
        self.plan_seed(nics)
        self.plan_definition(nics)
        self.plan_state()
        self.plan_record(nics)

    def adopt_interfaces(self):
        """Interfaces of a managed domain whose record is gone, matched to networks by bridge."""
        by_bridge, prefix = {}, self.ctx.params["namespace_prefix"]
        for network, record in self.ctx.networks().items():
            if isinstance(record, dict) and record.get("vni") is not None:
                by_bridge[net_utils.device_names(record["vni"], prefix)["bridge"]] = network
        return [{"network": by_bridge[nic["bridge"]], "mac": nic["mac"], "ip": None}
                for nic in self.seen["definition"]["nics"] if nic["bridge"] in by_bridge]

    def plan_disks(self):
        """Grow the root and ephemeral disks to their sizes; add missing ephemerals; refuse to shrink."""
        running = self.seen["state"] == "running"
        wanted = [(self.file("root.qcow2"), self.want["disk_size"], "vda")]
        targets = dom_xml.disk_targets(1 + len(self.want["ephemeral_disks"]))
        for index, size in enumerate(self.want["ephemeral_disks"]):
            wanted.append((self.ephemeral_path(index), size, targets[index + 1]))
        for path, size, target in wanted:
            if not os.path.exists(path):
                self.plan.add("create ephemeral disk %s (%s)" % (path, disk_ops.human(size)), disk_ops.create_blank,
                              path, size)
                continue
            current = disk_ops.virtual_size(path)
            if size is None or size == current:
                continue
            if size < current:
                raise InvalidInput("instance %s: disk %s is %s; shrinking it to %s is not allowed"
                                   % (self.name, path, disk_ops.human(current), disk_ops.human(size)),
                                   disk=path, size=size, current=current)
            self.plan.compare("disk %s" % target, current, size)
            if running:
                self.plan.add("grow %s of the running domain to %s" % (target, disk_ops.human(size)),
                              self.block_resize, target, size)
            else:
                self.plan.add("grow %s to %s" % (path, disk_ops.human(size)), disk_ops.grow, path, size)
        for index in range(len(self.want["ephemeral_disks"]), 64):
            path = self.ephemeral_path(index)
            if not os.path.exists(path):
                break
            if running:
                raise InvalidInput("instance %s: removing ephemeral disk %s needs the instance stopped first"
                                   % (self.name, path), disk=path)
            self.plan.add("delete ephemeral disk %s" % path, disk_ops.remove, path)

    def block_resize(self, target, size):
        """Grow a disk of the running domain (qemu-img must not touch an image in use)."""
        self.domain.blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def plan_interfaces(self, current, kept, added, removed):
        """Release interfaces no longer wanted, allocate new ones; the interface list after the change."""
        before = [self.nic_view(nic) for nic in current]
        for nic in removed:
            self.plan.add("release %s and %s on network %s" % (nic["mac"], nic.get("ip"), nic["network"]),
                          self.release, nic)
        nics = [dict(nic) for nic in kept]
        for nic in added:
            entry = {"network": nic["network"], "mac": nic["mac"], "ip": nic["ip"]}
            if nic.get("old_ip"):
                self.plan.add("release %s on network %s" % (nic["old_ip"], nic["network"]), self.release,
                              {"network": nic["network"], "ip": nic["old_ip"]})
            self.plan.add("allocate %s on network %s" % (nic["ip"] or "an IP", nic["network"]), self.allocate_into,
                          nic, entry)
            nics.append(entry)
        order = [network for network, _ip in self.want["networks"]]
        nics.sort(key=lambda nic: order.index(nic["network"]))
        self.plan.compare("interfaces", before, [self.nic_view(nic) for nic in nics])
        return nics

    def allocate_into(self, nic, entry):
        """Allocate for ``nic`` and fill ``entry`` (the later steps read it)."""
        entry.update(self.allocate(nic))
        self.undo = []

    def release(self, nic):
        """Free an interface's IP and (when given) MAC."""
        if nic.get("ip"):
            self.ctx.store.release_ip(nic["network"], nic["ip"], owner=self.owner)
        if nic.get("mac"):
            self.ctx.store.release_mac(nic["mac"], owner=self.owner)

    def plan_seed(self, nics):
        """Rebuild the seed when its inputs changed or the ISO is gone."""
        self.seed_digest = (self.record or {}).get("seed")
        pending = any(nic["mac"] is None for nic in nics)
        if not pending:
            wanted = seed_ops.digest(self.seed_files(nics))
            if wanted == self.seed_digest and os.path.exists(self.file("seed.iso")):
                return
            self.plan.compare("seed", self.seed_digest, wanted)
        self.plan.add("write seed %s" % self.file("seed.iso"), lambda: self.write_seed(nics))
        if self.seen["state"] == "running":
            self.needs_restart = True

    def plan_definition(self, nics):
        """Redefine the domain when a managed field differs; a running guest sees it after a restart."""
        pending = any(nic["mac"] is None for nic in nics)
        desired = self.spec([dict(nic, mac=nic["mac"] or NOT_YET) for nic in nics])
        changed = dom_xml.differences(self.seen["definition"], desired)
        if changed:
            for field in sorted(changed):
                self.plan.compare(field, changed[field][0], changed[field][1])
        if changed or pending:
            self.plan.add("redefine domain %s (%s)" % (self.name, ", ".join(sorted(changed)) or "new interfaces"),
                          lambda: self.ctx.conn.defineXML(dom_xml.build_xml(self.spec(nics))))
        running = self.seen["state"] == "running"
        if running and (changed or pending):
            self.needs_restart = True
        elif running and dom_xml.differences(self.seen["live"], desired):
            self.needs_restart = True  # redefined by an earlier run, not restarted since
        if self.want["autostart"] != self.seen["autostart"]:
            self.plan.compare("autostart", self.seen["autostart"], self.want["autostart"])
            self.plan.add("set autostart %s" % ("on" if self.want["autostart"] else "off"),
                          lambda: self.domain.setAutostart(1 if self.want["autostart"] else 0))

    def plan_state(self):
        """Start or stop the domain to match the wanted state."""
        have, want = self.seen["state"], self.want["state"]
        self.plan.compare("state", have, want)
        if have == want:
            return
        if want == "running":
            self.plan.add("start domain %s" % self.name, self.start)
            self.needs_restart = False  # a fresh start picks up the new definition
        else:
            self.plan_stop()
            self.needs_restart = False

    def plan_record(self, nics):
        """Write the record when what it says differs from the stored one."""
        if any(nic["mac"] is None for nic in nics) or self.plan.changed or self.record is None:
            self.plan.add("record etcd %s" % self.path, lambda: self.write_record(nics))
            return
        wanted = self.record_for(nics, self.want["state"])
        if wanted != self.record:
            self.plan.compare("record", self.record, wanted)
            self.plan.add("record etcd %s" % self.path, lambda: self.write_record(nics))

    def write_record(self, nics):
        """Put the record and refresh the leases of its networks' DHCP."""
        old = set(nic["network"] for nic in (self.record or {}).get("interfaces") or [])
        self.record = self.record_for(nics, self.want["state"])
        self.ctx.store.put(self.path, self.record)
        self.ctx.refresh_leases(old | set(nic["network"] for nic in nics))

    # state ---------------------------------------------------------------------------------------

    def start(self):
        """Start the domain; the record says running."""
        try:
            self.domain.create()
        except libvirt.libvirtError as error:
            raise HostError("instance %s did not start: %s" % (self.name, error), name=self.name) from error
        self.undo = []
        if self.record is not None and self.record.get("state") != "running":
            self.record = dict(self.record, state="running")
            self.ctx.store.put(self.path, self.record)

    def plan_stop(self):
        self.stopping = True
        self.plan.add("shut down domain %s (ACPI, then force after %d s)"
                      % (self.name, self.want["shutdown_timeout"]), self.stop)

    def request_shutdown(self):
        """Send the ACPI shutdown the plan will wait for, and start its clock (once)."""
        if not self.stopping or self.shutdown_deadline is not None:
            return
        self.shutdown_deadline = time.time() + self.want["shutdown_timeout"]
        if self.want["shutdown_timeout"] > 0 and self.domain.isActive():
            try:
                self.domain.shutdown()
            except libvirt.libvirtError:
                pass  # e.g. no ACPI: forced off by stop()

    def stop(self):
        """ACPI shutdown, wait up to shutdown_timeout after asking, then force it off."""
        domain = self.domain
        if not domain.isActive():
            return
        self.request_shutdown()  # a no-op when the batch already asked
        while time.time() < self.shutdown_deadline and domain.isActive():
            time.sleep(0.2)
        if domain.isActive():
            try:
                domain.destroy()
            except libvirt.libvirtError:
                if domain.isActive():
                    raise

    def undefine(self):
        """Undefine the domain with every extra (managed save, snapshots, NVRAM, checkpoints)."""
        if self.domain.isActive():
            self.domain.destroy()
        self.domain.undefineFlags(undefine_flags())

    # absent --------------------------------------------------------------------------------------

    def plan_absent(self):
        """Stop, undefine, delete files, release allocations, delete the record."""
        before = "absent"
        if self.seen is not None:
            before = self.seen["state"]
        elif self.record is not None or os.path.isdir(self.dir):
            before = "leftovers"
        self.plan.compare("state", before, "absent")
        if self.seen is not None:
            if self.seen["state"] == "running":
                self.plan_stop()
            self.plan.add("undefine domain %s" % self.name, self.undefine)
        if os.path.isdir(self.dir):
            self.plan.add("delete %s (disks, seed, console log)" % self.dir, shutil.rmtree, self.dir)
        if self.record is not None:
            interfaces = self.record.get("interfaces") or []
            for nic in interfaces:
                self.plan.add("release %s and %s on network %s" % (nic.get("mac"), nic.get("ip"), nic["network"]),
                              self.release, nic)
            self.plan.add("delete etcd %s" % self.path, self.forget, [nic["network"] for nic in interfaces])

    def forget(self, networks):
        """Delete the record, drop the leases and log the removal."""
        self.ctx.store.delete(self.path)
        self.ctx.refresh_leases(networks)
        self.ctx.store.log_event("instance", self.name, "deleted on %s" % self.ctx.host)
        self.record = None

    # result --------------------------------------------------------------------------------------

    def converge(self):
        """Apply the plan (under the instance's lock when something changes) and return the instance's facts."""
        if self.creating or self.ctx.check_mode or not self.plan.changed:
            self.plan.apply(self.ctx.check_mode)  # a creation takes the lock itself, around its undo
            return self.facts()
        with self.ctx.store.lock(self.owner, ttl=60, timeout=120):
            with host_errors(self.name):
                self.plan.apply(False)
        return self.facts()

    def facts(self):
        """What the task returns for this instance."""
        record = self.record or {}
        if self.want["state"] == "absent":
            return {"name": self.name, "state": "absent", "changed": self.plan.changed, "actions": self.plan.actions,
                    "host": self.ctx.host}
        interfaces = record.get("interfaces") or [self.nic_view(nic) for nic in getattr(self, "new_nics", [])]
        return {
            "name": self.name, "host": self.ctx.host, "state": self.want["state"], "uuid": record.get("uuid"),
            "interfaces": interfaces, "ips": [nic.get("ip") for nic in interfaces],
            "macs": [nic.get("mac") for nic in interfaces], "disks": [disk["path"] for disk in self.disks()],
            "console_log": self.file("console.log"), "hostname": self.want["hostname"],
            "changed": self.plan.changed, "needs_restart": self.needs_restart, "actions": self.plan.actions,
        }
