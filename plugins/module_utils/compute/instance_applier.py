# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The steps that change one instance. The planner queues them; each step that can be undone registers its
undo on the plan, so a creation that fails half way leaves no disk, domain, record or allocation.

The applier holds what changes while the plan runs (the domain handle, the record, the seed digest) and
is the one place that talks to libvirt, qemu-img and etcd on an instance's behalf.
"""

import contextlib
import os
import shutil
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import disks as disk_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import seed as seed_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.connection import (
    host_errors,
    libvirt,
    reopen_libvirt,
    undefine_flags,
    wait_stopped,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import (
    ChangedMeanwhile,
    Conflict,
    HostError,
    InvalidInput,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import resolved
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import guest_filter
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.leases import refresh_leases
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records


class InstanceApplier:
    """The changes of instance ``model.name``, run by its plan."""

    def __init__(self, observation, model, record, uuid):
        self.obs = observation
        self.store = observation.store
        self.model = model
        self.name = model.name
        self.owner = "instance/%s" % self.name
        self.path = records.instance_key(self.name)
        self.domain = observation.domains.get(self.name)
        self.record = record
        self.uuid = uuid
        self.seed_digest = (record or {}).get("seed")
        self.shutdown_deadline = None
        self.made_dir = False
        self.taken_back = set()  # values a killed run of this instance left allocated, taken back by this run

    @contextlib.contextmanager
    def holding_lock(self, creating):
        """The instance's lock, held while its plan applies; a creation first checks that nobody recorded the
        instance since it was observed."""
        with self.store.lock(self.owner, timeout=120):
            if creating:
                self.check_record_unchanged()
            yield

    def check_record_unchanged(self):
        stored = self.store.get(self.path)
        if stored is not None and stored != self.record:
            raise ChangedMeanwhile("instance %s was changed by someone else meanwhile" % self.name, name=self.name)

    # allocations -----------------------------------------------------------------------------------

    def allocate_mac(self, requested):
        requested = requested or self.left_over("mac", self.kept_macs())
        return self.store.allocate_mac(self.owner, requested=requested)

    def release_mac(self, mac):
        self.store.release_mac(mac, owner=self.owner)

    def allocate_ip(self, network, requested):
        kept = [nic.get("ip") for nic in self.recorded_nics() if nic["network"] == network]
        requested = requested or self.left_over(records.ipam_folder(network), kept)
        return self.store.allocate_ip(network, self.obs.networks()[network]["cidr"], self.owner, requested=requested)

    def release_ip(self, network, address):
        self.store.release_ip(network, address, owner=self.owner)

    def left_over(self, folder, kept):
        """A value of allocation ``folder`` held by this instance that is neither ``kept`` nor taken by this run:
        one a run killed before recording it left behind, taken back instead of leaked (None: there is none)."""
        for value in self.store.held_by(folder, self.owner):
            if value not in kept and value not in self.taken_back:
                self.taken_back.add(value)
                return value
        return None

    def recorded_nics(self):
        return (self.record or {}).get("interfaces") or []

    def kept_macs(self):
        """The MACs this instance keeps: its record's, and its domain's (which the planner adopts without one)."""
        seen = self.obs.domain(self.name) if self.domain is not None else None
        return [nic.get("mac") for nic in self.recorded_nics() + (seen["definition"]["nics"] if seen else [])]

    def release(self, nic):
        """Free an interface's IP and (when given) MAC."""
        if nic.get("ip"):
            self.release_ip(nic["network"], nic["ip"])
        if nic.get("mac"):
            self.release_mac(nic["mac"])

    # files -----------------------------------------------------------------------------------------

    def make_dir(self):
        """The instance's directory, unless it is there."""
        if not os.path.isdir(self.model.dir):
            os.makedirs(self.model.dir, 0o755)
            self.made_dir = True

    def remove_dir_made(self):
        """Undo of make_dir: the directory goes only when this run made it."""
        if self.made_dir:
            shutil.rmtree(self.model.dir, ignore_errors=True)

    def create_root(self, image):
        """The root overlay on the cached image, at disk_size (checked against an image fetched just now)."""
        size = self.model.want["disk_size"]
        if size is not None and image["virtual_size"] is None:
            check_disk_size(self.model.want, size, disk_ops.virtual_size(image["path"]))
        disk_ops.create_overlay(self.model.root, image["path"], image["format"], size)

    def write_seed(self, nics):
        """Write the seed ISO for ``nics``; keep its digest for the record."""
        files = self.model.seed_files(resolved(nics), self.uuid)
        self.seed_digest = seed_ops.digest(files)
        seed_ops.write_iso(self.model.seed_path, files)

    def delete_files(self):
        shutil.rmtree(self.model.dir)

    # the domain ------------------------------------------------------------------------------------

    def define(self, nics):
        """Define (or redefine) the domain for ``nics``."""
        self.domain = self.obs.conn.defineXML(dom_xml.build_xml(self.model.spec(resolved(nics), self.uuid)))

    def set_autostart(self, enabled):
        self.domain.setAutostart(1 if enabled else 0)

    def block_resize(self, target, size):
        """Grow a disk of the running domain (qemu-img must not touch an image in use)."""
        self.domain.blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def enforce_security_groups(self):
        """This host's guest filter (network.guest_filter) from the records as they are now."""
        guest_filter.converge_now(self.obs.host, self.store)

    def start(self):
        """Start the domain; the record says running."""
        try:
            # Another run converging the same instance may have started it between this run's look and its lock.
            if not self.domain.isActive():
                self.domain.create()
        except libvirt.libvirtError as error:
            raise HostError("instance %s did not start: libvirt at %s: %s" % (self.name, self.obs.params["uri"], error),
                            name=self.name) from error
        if self.record is not None and self.record.get("state") != "running":
            self.record = dict(self.record, state="running")
            self.store.put(self.path, self.record)

    def ask_shutdown(self, timeout):
        """Send the ACPI shutdown that ``stop`` waits for, and start its clock."""
        self.shutdown_deadline = time.time() + timeout
        if timeout > 0 and self.domain.isActive():
            try:
                self.domain.shutdown()
            except libvirt.libvirtError:
                pass  # e.g. no ACPI: forced off by stop()

    def stop(self, timeout):
        """Wait until the deadline the ACPI request set (asking now if nobody did), then force it off."""
        domain = self.domain
        if not domain.isActive():
            return
        if self.shutdown_deadline is None:
            self.ask_shutdown(timeout)
        wait_stopped(domain, self.shutdown_deadline)

    def undefine(self):
        """Undefine the domain with every extra (managed save, snapshots, NVRAM, checkpoints).

        Over a new connection when the batch's broke (libvirtd restarted): as the undo of a creation that failed
        for that reason, it must still remove the domain, or the undo leaves a domain whose disks it deleted.
        """
        try:
            self.undefine_now()
        except libvirt.libvirtError as error:
            if error.get_error_domain() != libvirt.VIR_FROM_RPC:  # not the connection: libvirt refused
                raise
            self.obs.conn = reopen_libvirt(self.obs.params["uri"])
            try:
                self.domain = self.obs.conn.lookupByName(self.name)
            except libvirt.libvirtError as missing:
                if missing.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return  # the restarted libvirtd never had it: nothing to undefine
                raise
            self.undefine_now()

    def undefine_now(self):
        """Destroy (if running) and undefine the domain over the handle at hand."""
        if self.domain.isActive():
            self.domain.destroy()
        self.domain.undefineFlags(undefine_flags())

    # the record ------------------------------------------------------------------------------------

    def write_record(self, nics, state):
        """Put the record for ``nics`` and refresh the DHCP leases of its old and new networks."""
        nics = resolved(nics)
        old, self.record = self.record, self.model.record(nics, state, self.uuid, self.obs.host, self.seed_digest)
        self.store.put(self.path, self.record)
        self.refresh_leases({nic["network"] for nic in (old or {}).get("interfaces") or []} |
                            {nic["network"] for nic in nics})

    def create_record(self, nics, state):
        """Record a new instance (create-if-absent unless a domain-less record was adopted)."""
        nics = resolved(nics)
        adopted = self.record
        record = self.model.record(nics, state, self.uuid, self.obs.host, self.seed_digest)
        if adopted is not None:
            self.store.put(self.path, record)
        elif not self.store.create(self.path, record):
            raise Conflict("instance %s was recorded by someone else meanwhile" % self.name, name=self.name)
        self.record = record
        self.refresh_leases([nic["network"] for nic in nics])
        return adopted

    def restore_record(self, adopted):
        """Undo of create_record: the adopted record back, or none."""
        if adopted is not None:
            self.store.put(self.path, adopted)
        else:
            self.store.delete(self.path)

    def log_created(self):
        self.store.log_event("instance", self.name, "created on %s" % self.obs.host)

    def forget(self, networks):
        """Delete the record, drop the leases and log the removal."""
        self.store.delete(self.path)
        self.refresh_leases(networks)
        self.store.log_event("instance", self.name, "deleted on %s" % self.obs.host)
        self.record = None

    def refresh_leases(self, network_names):
        """Have each network's dnsmasq that runs on this host serve the current instance records."""
        listing = None
        for network in sorted(set(network_names)):
            record = self.obs.networks().get(network) or self.store.get(records.network_key(network))
            if not record:
                continue
            if listing is None:
                listing = records.instances(self.store)
            refresh_leases(network, record, listing, self.obs.params["state_dir"], self.obs.params["namespace_prefix"])

    def errors(self):
        """libvirt and file system errors of this instance's steps, as HostError naming it."""
        return host_errors(self.name)


def check_disk_size(want, size, image_size):
    """Refuse a root disk smaller than its image: disks are never shrunk."""
    if image_size and size < image_size:
        raise InvalidInput("instance %s: disk_size %s is smaller than image %s (%s); disks are never shrunk"
                           % (want["name"], disk_ops.human(size), want["image"], disk_ops.human(image_size)),
                           disk_size=size, image_size=image_size)
