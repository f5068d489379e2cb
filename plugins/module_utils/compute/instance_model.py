# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The desired definition of one instance: its files, disks, domain spec, seed and etcd record.

Pure functions of what was asked for (``want``), where instances live, and the networks' bridges; the
planner compares them with what is observed and the applier writes them.
"""

import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import seed as seed_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import NOT_YET
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import bridge_of


class InstanceModel:
    """Paths and desired documents of instance ``want["name"]``.

    ``networks`` is a function returning the ``networks/`` records; ``recorded_bridges`` the bridges its
    record names (kept, so an instance keeps its bridge even if a network were recreated).
    """

    def __init__(self, want, instances_dir, namespace_prefix, networks, recorded_bridges=None):
        self.want = want
        self.name = want["name"]
        self.dir = os.path.join(instances_dir, self.name)
        self.namespace_prefix = namespace_prefix
        self.networks = networks
        self.recorded_bridges = recorded_bridges or {}

    # paths -------------------------------------------------------------------------------------

    def file(self, name):
        return os.path.join(self.dir, name)

    @property
    def root(self):
        return self.file("root.qcow2")

    @property
    def seed_path(self):
        return self.file("seed.iso")

    @property
    def console_log(self):
        return self.file("console.log")

    def ephemeral_path(self, index):
        return self.file("ephemeral-%d.qcow2" % index)

    # the definition ------------------------------------------------------------------------------

    def bridge(self, network):
        """The bridge of ``network``: from the record, else derived from the network's VNI."""
        if network in self.recorded_bridges:
            return self.recorded_bridges[network]
        return bridge_of(self.networks()[network], self.namespace_prefix)

    def disks(self):
        """The disk list of the definition: root, ephemerals, seed cdrom."""
        count = 1 + len(self.want["ephemeral_disks"])
        targets = dom_xml.disk_targets(count)
        out = [{"device": "disk", "target": targets[0], "bus": dom_xml.DISK_BUS, "path": self.root,
                "format": "qcow2"}]
        for index in range(len(self.want["ephemeral_disks"])):
            out.append({"device": "disk", "target": targets[index + 1], "bus": dom_xml.DISK_BUS,
                        "path": self.ephemeral_path(index), "format": "qcow2"})
        out.append({"device": "cdrom", "target": "sda", "bus": dom_xml.SEED_BUS, "path": self.seed_path,
                    "format": "raw"})
        return out

    def spec(self, nics, uuid):
        """The domain spec for ``nics`` (``{network, mac, ip}``)."""
        return {
            "name": self.name, "uuid": uuid, "virt_type": self.want["virt_type"], "cpus": self.want["cpus"],
            "memory": self.want["memory"], "disks": self.disks(),
            "nics": [{"mac": nic["mac"], "bridge": self.bridge(nic["network"]), "model": dom_xml.NIC_MODEL}
                     for nic in nics],
            "console_log": self.console_log,
        }

    def summary(self):
        """The managed fields a new definition will have (the diff of a creation)."""
        return {"virt_type": self.want["virt_type"], "cpus": self.want["cpus"], "memory": self.want["memory"],
                "disks": self.disks(), "autostart": self.want["autostart"], "hostname": self.want["hostname"]}

    def seed_files(self, nics, uuid):
        return seed_ops.seed_files(uuid, self.want["hostname"], self.want["ssh_keys"], self.want["user_data"],
                                   [nic["mac"] for nic in nics])

    def record(self, nics, state, uuid, host, seed_digest):
        """The etcd record of this instance."""
        return {
            "name": self.name,
            "interfaces": [{"network": nic["network"], "mac": nic["mac"], "ip": nic["ip"]} for nic in nics],
            "host": host, "uuid": uuid, "state": state, "image": self.want["image"],
            "cpus": self.want["cpus"], "memory": self.want["memory"], "virt_type": self.want["virt_type"],
            "disk_size": self.want["disk_size"], "ephemeral_disks": self.want["ephemeral_disks"],
            "disks": [disk["path"] for disk in self.disks()],
            "bridges": {nic["network"]: self.bridge(nic["network"]) for nic in nics},
            "hostname": self.want["hostname"], "seed": seed_digest, "console_log": self.console_log,
            "autostart": self.want["autostart"], "metadata": self.want["metadata"],
            "security_groups": self.want["security_groups"],
        }

    def ordered(self, nics):
        """``nics`` in the order of the wanted networks."""
        order = [network for network, _ip in self.want["networks"]]
        return sorted(nics, key=lambda nic: order.index(nic["network"]))


def nic_view(nic):
    """An interface as the diff shows it (a value not allocated yet says so)."""
    return {"network": nic["network"], "mac": nic.get("mac") or NOT_YET, "ip": nic.get("ip") or NOT_YET}
