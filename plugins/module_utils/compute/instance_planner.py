# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Wanted + observed -> steps, for one instance. Everything is validated here, before any step runs.

Two plans per instance: ``shutdown`` (the ACPI request of a guest the batch stops, sent for the whole batch
before anything else so the waits overlap) and ``plan`` (everything else, in order). MACs and IPs are
allocation steps whose values the later steps (seed, definition, record) read when they run.
"""

import contextlib
import ipaddress
import os
import uuid

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import disks as disk_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import seed as seed_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_applier import (
    InstanceApplier,
    check_disk_size,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_model import InstanceModel, nic_view
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_spec import MEMORY_MIN
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import NOT_YET, Plan, resolved, unresolved
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import Placements, placement_key
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.addressing import check_usable
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import bridge_of
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records

MAX_EPHEMERAL = 64


def macs_pending(nics):
    """Whether a MAC of ``nics`` is allocated on apply (the definition and seed name MACs, not IPs)."""
    return any(unresolved(nic["mac"]) for nic in nics)


class InstancePlanner:
    """Observe instance ``want["name"]`` and plan it; ``facts()`` after the apply is its result entry."""

    def __init__(self, observation, want):
        self.obs = observation
        self.want = want
        self.name = want["name"]
        self.record = observation.records.get(self.name)
        self.model = InstanceModel(want, observation.params["instances_dir"], observation.params["namespace_prefix"],
                                   observation.networks, (self.record or {}).get("bridges"))
        self.seen = observation.domain(self.name)
        self.applier = InstanceApplier(observation, self.model, self.record,
                                       (self.record or {}).get("uuid") or str(uuid.uuid4()))
        if self.seen is not None:
            self.applier.uuid = self.seen["definition"]["uuid"]
        self.shutdown = Plan()
        self.plan = Plan()
        self.creating = False
        self.needs_restart = False
        self.nics = []
        self.adopted = None

    # the entry point -------------------------------------------------------------------------------

    def build(self):
        """Validate against the store and the host and plan every step; nothing is changed here."""
        moving_to = (self.record or {}).get("moving_to")
        if moving_to:
            # Until the move commits, the source's copy is stopped and the target's may run: touching either
            # could run the guest twice. The evacuation that started the move finishes it when run again.
            raise Conflict("instance %s is being moved from %s to %s; run the evacuation of %s again to finish it"
                           % (self.name, self.record.get("host"), moving_to, self.record.get("host")),
                           name=self.name, moving_to=moving_to)
        elsewhere = (self.record or {}).get("host")
        if self.seen is None and elsewhere not in (None, self.obs.host):
            raise Conflict("instance %s is recorded on host %s; converge it there" % (self.name, elsewhere),
                           name=self.name, host=elsewhere)
        if self.seen is not None and not self.seen["definition"]["managed"] and self.record is None:
            raise Conflict("a domain named %s exists but was not made by smallcloud; choose another name" % self.name,
                           name=self.name)
        if self.want["state"] == "absent":
            return self.plan_absent()
        self.check_security_groups()
        if self.seen is None or not os.path.exists(self.model.root):
            if self.seen is not None:
                self.plan_leftover_undefine()
            return self.plan_create()
        return self.plan_update()

    def plan_leftover_undefine(self):
        """A managed domain without a record and without its root disk is what a creation that did not finish
        leaves (killed, or libvirtd gone while it undid itself): undefined, then created again. With a record, the
        disk of a real instance is gone: that is for the operator to decide."""
        if self.record is not None or not self.seen["definition"]["managed"]:
            raise HostError("instance %s is defined but its root disk %s is missing; remove it with state=absent"
                            % (self.name, self.model.root), name=self.name)
        self.plan.add("undefine domain %s (left by a creation that did not finish: no record, no root disk)"
                      % self.name, self.applier.undefine)

    def lock(self):
        """What a real apply holds: the instance's lock when the plan changes anything."""
        if not self.plan.changed:
            return contextlib.nullcontext()
        return self.applier.holding_lock(self.creating)

    @property
    def changed(self):
        return self.shutdown.changed or self.plan.changed

    @property
    def actions(self):
        return self.shutdown.actions + self.plan.actions

    # checks ----------------------------------------------------------------------------------------

    def interfaces_plan(self, current):
        """``(kept, added, removed)``: recorded interfaces ``{network, mac, ip}`` against the wanted networks."""
        by_network = {nic["network"]: nic for nic in current}
        kept, added = [], []
        for network, address in self.want["networks"]:
            nic = by_network.get(network)
            if nic is not None and nic.get("ip") and (address is None or address == nic["ip"]):
                kept.append(nic)
            else:
                added.append({"network": network, "mac": nic["mac"] if nic else None, "ip": address,
                              "old_ip": nic.get("ip") if nic else None})
        wanted_names = {network for network, _ip in self.want["networks"]}
        removed = [nic for nic in current if nic["network"] not in wanted_names]
        return kept, added, removed

    def check_networks(self, added):
        """Each new interface's network exists, its bridge is on this host, and a fixed IP is free and in range."""
        for nic in added:
            record = self.obs.networks().get(nic["network"])
            if not record or record.get("vni") is None:
                known = sorted(self.obs.networks())
                raise InvalidInput("instance %s: network %s does not exist (known: %s)"
                                   % (self.name, nic["network"], ", ".join(known) or "none"), network=nic["network"])
            bridge = bridge_of(record, self.obs.params["namespace_prefix"])
            if not self.obs.bridge_present(bridge):
                raise HostError("instance %s: network %s has no bridge %s on this host; converge the network here first"
                                % (self.name, nic["network"], bridge), network=nic["network"], bridge=bridge)
            if nic["ip"] is not None:
                self.check_fixed_ip(nic["network"], record["cidr"], nic["ip"])

    def check_fixed_ip(self, network, cidr, address):
        """A fixed IP must be a guest address of the network and not taken by another owner."""
        check_usable(ipaddress.ip_network(cidr), address, "ip", where="network %s (%s)" % (network, cidr),
                     subject="instance %s: " % self.name)
        owner = records.holder(self.obs.store, records.ipam_key(network, address))
        if owner is not None and owner != self.applier.owner:
            raise Conflict("instance %s: ip %s on network %s is taken by %s" % (self.name, address, network, owner),
                           ip=address, network=network, owner=owner)

    def check_host(self):
        """Memory within what the host has."""
        if self.want["memory"] > self.obs.host_memory():
            raise InvalidInput("instance %s: memory %d MiB is out of range: this host has %d MiB"
                               % (self.name, self.want["memory"], self.obs.host_memory()),
                               memory=self.want["memory"], allowed="%d..%d" % (MEMORY_MIN, self.obs.host_memory()))

    def check_security_groups(self):
        """Every security group the instance takes exists (etcd is asked only when it takes any)."""
        missing = [group for group in self.want["security_groups"] if group not in self.obs.security_groups()]
        if missing:
            raise InvalidInput("instance %s: security group %s does not exist; existing groups: %s"
                               % (self.name, ", ".join(missing), sorted(self.obs.security_groups()) or "none"),
                               security_groups=missing, allowed=sorted(self.obs.security_groups()))

    # create ----------------------------------------------------------------------------------------

    def plan_create(self):
        """Validate a new instance and plan its creation; a failing step undoes the ones before it."""
        self.creating = True
        self.check_host()
        # A record without its domain (e.g. undefined by hand) keeps its MACs and IPs.
        current = list((self.record or {}).get("interfaces") or [])
        kept, added, removed = self.interfaces_plan(current)
        self.check_networks(added)
        image, fetch = self.obs.image(self.want)
        if self.want["disk_size"] is not None and image["virtual_size"]:
            check_disk_size(self.want, self.want["disk_size"], image["virtual_size"])
        if fetch is not None:
            self.plan.merge(fetch)  # first: a failed download leaves no allocation to undo
        nics = self.model.ordered([dict(nic) for nic in kept] + [self.plan_allocation(nic) for nic in added])
        self.nics = nics
        self.plan.compare("state", "absent", self.want["state"])
        self.plan.compare("definition", None, self.model.summary())
        self.plan.compare("interfaces", [nic_view(nic) for nic in current], [nic_view(nic) for nic in nics])
        applier = self.applier
        self.plan.add("create directory %s" % self.model.dir, applier.make_dir).undone_by(applier.remove_dir_made)
        sized = " (%s)" % disk_ops.human(self.want["disk_size"]) if self.want["disk_size"] else ""
        self.plan.add("create root disk %s on %s%s" % (self.model.root, image["path"], sized), applier.create_root,
                      image).undone_by(disk_ops.remove, self.model.root)
        for index, size in enumerate(self.want["ephemeral_disks"]):
            path = self.model.ephemeral_path(index)
            self.plan.add("create ephemeral disk %s (%s)" % (path, disk_ops.human(size)), disk_ops.create_blank,
                          path, size).undone_by(disk_ops.remove, path)
        self.plan.add("write seed %s" % self.model.seed_path, applier.write_seed, nics)
        self.plan.add("define domain %s (%d vCPU, %d MiB, %s)" % (self.name, self.want["cpus"], self.want["memory"],
                                                                  self.want["virt_type"]),
                      applier.define, nics).undone_by(applier.undefine)
        if self.want["autostart"]:
            self.plan.add("set autostart on", applier.set_autostart, True)
        record_step = self.plan.add("record etcd %s" % applier.path, self.create_record, nics)
        record_step.undone_by(lambda: applier.restore_record(self.adopted))
        for nic in removed:
            self.plan.add("release %s and %s on network %s" % (nic.get("mac"), nic.get("ip"), nic["network"]),
                          applier.release, nic)
        if self.want["state"] == "running":
            # A new guest's first packet already meets its security groups (the batch's end writes them again).
            self.plan.add("write this host's security groups, %s's included" % self.name,
                          applier.enforce_security_groups)
            self.plan.add("start domain %s" % self.name, applier.start)
        self.plan.add("log the creation of %s" % self.name, applier.log_created)

    def create_record(self, nics):
        self.adopted = self.applier.create_record(nics, self.want["state"])

    # the result ------------------------------------------------------------------------------------

    def facts(self):
        """This instance's entry of the task result (after the apply, or previewed in check mode)."""
        facts = {"name": self.name, "host": self.obs.host, "changed": self.changed, "actions": self.actions}
        if self.want["state"] == "absent":
            return dict(facts, state="absent")
        record = self.applier.record or {}
        interfaces = record.get("interfaces") or resolved([nic_view(nic) for nic in self.nics])
        return dict(
            facts, state=self.want["state"], uuid=record.get("uuid"), interfaces=interfaces,
            ips=[nic.get("ip") for nic in interfaces], macs=[nic.get("mac") for nic in interfaces],
            disks=[disk["path"] for disk in self.model.disks()], console_log=self.model.console_log,
            hostname=self.want["hostname"], needs_restart=self.needs_restart, metadata=self.want["metadata"],
            security_groups=self.want["security_groups"],
        )

    def plan_allocation(self, nic):
        """Steps allocating a MAC (the recorded one when kept) and an IP for a new interface; the entry whose
        values they fill in."""
        applier, network = self.applier, nic["network"]
        mac = nic.get("mac")
        if mac is None:
            mac = self.plan.allocate("allocate a MAC for network %s" % network, applier.allocate_mac, None,
                                     release=applier.release_mac)
        else:
            self.plan.add("keep MAC %s for network %s" % (mac, network), applier.allocate_mac, mac)
        if nic.get("old_ip"):
            self.plan.add("release %s on network %s" % (nic["old_ip"], network), applier.release_ip, network,
                          nic["old_ip"]).undone_by(applier.allocate_ip, network, nic["old_ip"])
        ip = self.plan.allocate("allocate %s on network %s" % (nic["ip"] or "an IP", network), applier.allocate_ip,
                                network, nic["ip"], release=lambda address: applier.release_ip(network, address))
        return {"network": network, "mac": mac, "ip": ip}

    # update ----------------------------------------------------------------------------------------

    def plan_update(self):
        """Compare an existing instance field by field and plan what differs."""
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
        self.nics = nics
        self.plan_seed(nics)
        self.plan_definition(nics)
        self.plan_state()
        self.plan_record(nics)

    def adopt_interfaces(self):
        """Interfaces of a managed domain whose record is gone, matched to networks by bridge."""
        by_bridge, prefix = {}, self.obs.params["namespace_prefix"]
        for network, record in self.obs.networks().items():
            if isinstance(record, dict) and record.get("vni") is not None:
                by_bridge[bridge_of(record, prefix)] = network
        return [{"network": by_bridge[nic["bridge"]], "mac": nic["mac"], "ip": None}
                for nic in self.seen["definition"]["nics"] if nic["bridge"] in by_bridge]

    def plan_disks(self):
        """Grow the root and ephemeral disks to their sizes; add missing ephemerals; refuse to shrink."""
        running = self.seen["state"] == "running"
        wanted = [(self.model.root, self.want["disk_size"], "vda")]
        targets = dom_xml.disk_targets(1 + len(self.want["ephemeral_disks"]))
        for index, size in enumerate(self.want["ephemeral_disks"]):
            wanted.append((self.model.ephemeral_path(index), size, targets[index + 1]))
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
                              self.applier.block_resize, target, size)
            else:
                self.plan.add("grow %s to %s" % (path, disk_ops.human(size)), disk_ops.grow, path, size)
        for index in range(len(self.want["ephemeral_disks"]), MAX_EPHEMERAL):
            path = self.model.ephemeral_path(index)
            if not os.path.exists(path):
                break
            if running:
                raise InvalidInput("instance %s: removing ephemeral disk %s needs the instance stopped first"
                                   % (self.name, path), disk=path)
            self.plan.add("delete ephemeral disk %s" % path, disk_ops.remove, path)

    def plan_interfaces(self, current, kept, added, removed):
        """Release interfaces no longer wanted, allocate new ones; the interface list after the change."""
        for nic in removed:
            self.plan.add("release %s and %s on network %s" % (nic["mac"], nic.get("ip"), nic["network"]),
                          self.applier.release, nic)
        nics = self.model.ordered([dict(nic) for nic in kept] + [self.plan_allocation(nic) for nic in added])
        self.plan.compare("interfaces", [nic_view(nic) for nic in current], [nic_view(nic) for nic in nics])
        return nics

    def plan_seed(self, nics):
        """Rebuild the seed when its inputs (the MACs among them) changed or the ISO is gone."""
        if not macs_pending(nics):
            wanted = seed_ops.digest(self.model.seed_files(nics, self.applier.uuid))
            if wanted == self.applier.seed_digest and os.path.exists(self.model.seed_path):
                return
            self.plan.compare("seed", self.applier.seed_digest, wanted)
        self.plan.add("write seed %s" % self.model.seed_path, self.applier.write_seed, nics)
        if self.seen["state"] == "running":
            self.needs_restart = True

    def plan_definition(self, nics):
        """Redefine the domain when a managed field differs; a running guest sees it after a restart."""
        pending = macs_pending(nics)
        desired = self.model.spec([dict(nic, mac=NOT_YET) if unresolved(nic["mac"]) else nic for nic in nics],
                                  self.applier.uuid)
        changed = dom_xml.differences(self.seen["definition"], desired)
        for field in sorted(changed):
            self.plan.compare(field, changed[field][0], changed[field][1])
        if changed or pending:
            self.plan.add("redefine domain %s (%s)" % (self.name, ", ".join(sorted(changed)) or "new interfaces"),
                          self.applier.define, nics)
        running = self.seen["state"] == "running"
        if running and (changed or pending):
            self.needs_restart = True
        elif running and dom_xml.differences(self.seen["live"], desired):
            self.needs_restart = True  # redefined by an earlier run, not restarted since
        if self.want["autostart"] != self.seen["autostart"]:
            self.plan.compare("autostart", self.seen["autostart"], self.want["autostart"])
            self.plan.add("set autostart %s" % ("on" if self.want["autostart"] else "off"),
                          self.applier.set_autostart, self.want["autostart"])

    def plan_state(self):
        """Start or stop the domain to match the wanted state."""
        have, want = self.seen["state"], self.want["state"]
        if not self.plan.compare("state", have, want):
            return
        if want == "running":
            self.plan.add("start domain %s" % self.name, self.applier.start)
        else:
            self.plan_stop()
        self.needs_restart = False  # a fresh start picks up the new definition

    def plan_stop(self):
        """Ask for an ACPI shutdown (with the batch), then wait for it and force the domain off after the timeout."""
        timeout = self.want["shutdown_timeout"]
        self.shutdown.add("ask domain %s to shut down (ACPI)" % self.name, self.applier.ask_shutdown, timeout)
        self.plan.add("shut down domain %s (ACPI, then force after %d s)" % (self.name, timeout),
                      self.applier.stop, timeout)

    def plan_record(self, nics):
        """Write the record when what it says differs from the stored one."""
        if unresolved(nics) or self.plan.changed or self.record is None:
            self.plan.add("record etcd %s" % self.applier.path, self.applier.write_record, nics, self.want["state"])
            return
        wanted = self.model.record(nics, self.want["state"], self.applier.uuid, self.obs.host,
                                   self.applier.seed_digest)
        if self.plan.compare("record", self.record, wanted):
            self.plan.add("record etcd %s" % self.applier.path, self.applier.write_record, nics, self.want["state"])

    # absent ----------------------------------------------------------------------------------------

    def plan_absent(self):
        """Stop, undefine, delete files, release allocations, delete the record."""
        before = "absent"
        # The capacity reserved for it (host.placement), also when creating it never got that far.
        placed = self.obs.store.get(placement_key(self.name))
        # MACs a run that died before recording them left held (an IP left so goes with its network's ipam).
        recorded_macs = {nic.get("mac") for nic in self.applier.recorded_nics()}
        stray_macs = [mac for mac in self.obs.store.held_by("mac", self.applier.owner) if mac not in recorded_macs]
        if self.seen is not None:
            before = self.seen["state"]
        elif self.record is not None or os.path.isdir(self.model.dir) or placed is not None or stray_macs:
            before = "leftovers"
        self.plan.compare("state", before, "absent")
        if self.seen is not None:
            if self.seen["state"] == "running":
                self.plan_stop()
            self.plan.add("undefine domain %s" % self.name, self.applier.undefine)
        if os.path.isdir(self.model.dir):
            self.plan.add("delete %s (disks, seed, console log)" % self.model.dir, self.applier.delete_files)
        if self.record is not None:
            interfaces = self.record.get("interfaces") or []
            for nic in interfaces:
                self.plan.add("release %s and %s on network %s" % (nic.get("mac"), nic.get("ip"), nic["network"]),
                              self.applier.release, nic)
            self.plan.add("delete etcd %s" % self.applier.path, self.applier.forget,
                          [nic["network"] for nic in interfaces])
        for mac in stray_macs:
            self.plan.add("release MAC %s (allocated, never recorded)" % mac, self.applier.release_mac, mac)
        if placed is not None:
            self.plan.add("release the placement on %s" % placed.get("host"), Placements(self.obs.store).release,
                          self.name)
