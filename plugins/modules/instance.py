#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: instance
short_description: Cloud instances as libvirt domains on cached images, with MAC and IP from etcd
description:
  - Converges one instance (O(name)) or many in one call (O(instances)) on this host and records each in
    etcd under C(instances/NAME).
  - The root disk is a qcow2 overlay on the image from the image cache (see M(smallcloud.kvm.image)), grown
    to O(disk_size) and never shrunk. Ephemeral disks are created fresh. A cloud-init NoCloud seed (ISO
    labelled C(cidata)) carries the hostname, SSH keys, user-data and a network-config that takes DHCP on
    every NIC, plus vendor-data setting C(manage_etc_hosts) to true so the guest's own name resolves (user-data
    that sets C(manage_etc_hosts) wins). It is a cdrom on a virtio-scsi controller, which every cloud kernel
    sees (Debian's C(linux-image-cloud-amd64) has no SATA driver).
  - Each NIC gets a MAC and an IP allocated in etcd (owner C(instance/NAME)) and attaches to its network's
    bridge C(br-<vni hex>); when the network's DHCP runs on this host its static leases are refreshed.
  - The serial console is logged to C(<instances_dir>/NAME/console.log).
  - Idempotent by comparing libvirt's normalised definition field by field (vCPUs, memory, disks, NICs by
    MAC and bridge, virt type, console log). Changes a running guest only sees after a restart are written
    to the definition and reported as RV(needs_restart); the guest is never restarted silently.
  - O(state=stopped) shuts the guest down through ACPI and forces it off after O(shutdown_timeout) seconds.
    O(state=absent) also undefines the domain (with managed save, snapshots or NVRAM), deletes its disks,
    seed and console log, releases its MACs and IPs and deletes its record.
  - Every instance is validated before anything changes; a creation that fails undoes what it did.
  - A batch re-run with nothing to change costs one libvirt connection, one etcd listing and no command.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
  - smallcloud.kvm.libvirt
  - smallcloud.kvm.host_paths.image_cache
  - smallcloud.kvm.host_paths.network_state
  - smallcloud.kvm.host_paths.namespace
  - smallcloud.kvm.host_paths.sysfs
options:
  name:
    description:
      - Name of the instance and its libvirt domain (1-63 letters, digits, C(.), C(_) or C(-), starting with a
        letter or digit).
      - Mutually exclusive with O(instances).
    type: str
  instances:
    description:
      - Instances to converge in one call, each a dict with any of the per-instance options O(name) (required),
        O(image), O(image_checksum), O(cpus), O(memory), O(disk_size), O(ephemeral_disks), O(networks),
        O(ssh_keys), O(user_data), O(hostname), O(state), O(virt_type), O(shutdown_timeout), O(autostart),
        O(metadata).
      - A key left out takes the value of the top-level option, so shared settings are given once.
    type: list
    elements: dict
  image:
    description:
      - The image of the root disk, used when the root disk is created; later changes do not rebuild it.
      - A URL (C(https://), C(http://), C(file://)), an absolute path, or a catalog shorthand such as
        C(debian:12), fetched into O(cache_dir) like M(smallcloud.kvm.image) does.
      - Required unless O(state=absent).
    type: str
  image_checksum:
    description:
      - Checksum of a remote image, C(sha256:HEX) (or C(skip)); see the C(checksum) option of M(smallcloud.kvm.image).
    type: str
  cpus:
    description: Number of vCPUs (1..255).
    type: int
    default: 1
  memory:
    description: Memory in MiB (at least 32, at most what the host has).
    type: int
    default: 512
  disk_size:
    description:
      - Size of the root disk, for example C(10G), C(512M) or C(20GiB); a bare number means GiB.
      - Default the image's size. Never smaller than the image, and an existing disk is never shrunk.
    type: str
  ephemeral_disks:
    description: Sizes of extra empty qcow2 disks (C(vdb), C(vdc), ...), created fresh.
    type: list
    elements: str
    default: []
  networks:
    description:
      - Networks (made by M(smallcloud.kvm.network)) to attach, one NIC each, in order.
      - 'Each entry is a network name or a dict C({name: NETWORK, ip: ADDRESS}) asking for a fixed IP.'
    type: list
    elements: raw
    default: []
  ssh_keys:
    description: OpenSSH public keys put into the seed's meta-data (C(public-keys)).
    type: list
    elements: str
    default: []
  user_data:
    description:
      - cloud-init user-data, either cloud-config (a YAML mapping; the C(#cloud-config) header is added when
        missing) or a script starting with C(#!).
    type: str
  hostname:
    description: Hostname of the guest; default the instance name with C(_) and C(.) turned into C(-).
    type: str
  state:
    description: Whether the instance should be running, defined but stopped, or gone.
    type: str
    choices: [running, stopped, absent]
    default: running
  virt_type:
    description:
      - Domain type. C(auto) takes O(detected_virt_type) when given, else C(qemu) (TCG), which works everywhere.
    type: str
    choices: [auto, kvm, qemu]
    default: auto
  detected_virt_type:
    description:
      - What the host supports, as found by the hypervisor role (pass C({{ smallcloud_virt_type | default(omit) }})).
    type: str
    choices: [kvm, qemu]
  shutdown_timeout:
    description: Seconds to wait for an ACPI shutdown before forcing the domain off; C(0) forces at once.
    type: int
    default: 60
  autostart:
    description: Start the domain when libvirtd starts.
    type: bool
    default: false
  metadata:
    description:
      - Key/value strings recorded with the instance in etcd and returned, for the user's own bookkeeping
        (role, owner, ...). The inventory plugin P(smallcloud.kvm.cloud#inventory) exposes them as
        C(smallcloud_metadata) and filters on them.
      - Keys are 1-63 letters, digits, C(_), C(.) or C(-); values must be strings (quote numbers in YAML).
      - Changing them rewrites the record only; the guest does not see them.
    type: dict
    default: {}
  security_groups:
    description:
      - Names of M(smallcloud.kvm.security_group) groups whose rules let traffic in (and, with egress rules, out).
        Each must exist.
      - None (the default) - replies to what the guest opened and traffic from its own networks only; nothing
        from elsewhere, a floating IP's included. Egress is open unless a group has egress rules.
      - Enforced by this module on the host that runs the instance (nftables table C(inet smallcloud_guests),
        rewritten on every run where what it is made from changed); changing the list or a group's rules
        restarts nothing.
    type: list
    elements: str
    default: []
  wait_for:
    description:
      - V(ssh) waits, after every change is applied, until each running instance of the call answers with
        an SSH banner on port 22, so the next play can log in. Not in check mode.
      - An instance is probed on its first interface's address from that network's gateway namespace when
        the gateway runs on this host (the path the inventory plugin's proxy command takes), else on its
        floating IP. An instance with neither is refused before anything changes.
    type: str
    choices: [none, ssh]
    default: none
  wait_timeout:
    description: Seconds O(wait_for) waits for all instances of the call together; C(0) probes once.
    type: int
    default: 300
  instances_dir:
    description: Directory holding one subdirectory per instance with its disks, seed and console log.
    type: path
    default: /var/lib/smallcloud/instances
notes:
  - Supports check mode and diff mode.
  - Needs the libvirt Python bindings, C(qemu-img) and C(genisoimage) on the host.
requirements:
  - libvirt-python
  - qemu-img
  - genisoimage
"""

EXAMPLES = r"""
- name: One instance on the web network, with a fixed address
  smallcloud.kvm.instance:
    name: web1
    image: debian:12
    cpus: 2
    memory: 1024
    disk_size: 10G
    networks:
      - name: web
        ip: 10.0.0.10
    ssh_keys:
      - "{{ lookup('file', '~/.ssh/id_ed25519.pub') }}"
    virt_type: auto
    detected_virt_type: "{{ smallcloud_virt_type | default(omit) }}"

- name: Several instances in one call
  smallcloud.kvm.instance:
    image: https://images.example.com/tiny.qcow2
    image_checksum: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
    memory: 128
    networks: [web]
    instances:
      - name: node1
      - name: node2
        memory: 256
      - name: node3
        networks:
          - name: web
            ip: 10.0.0.13

- name: Stop one, remove another
  smallcloud.kvm.instance:
    instances:
      - name: web1
        state: stopped
      - name: node7
        state: absent
"""

RETURN = r"""
instances:
  description: One entry per instance, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Instance name.
      type: str
    host:
      description: The host it runs on.
      type: str
    state:
      description: C(running), C(stopped) or C(absent).
      type: str
    uuid:
      description: Domain UUID (also the cloud-init instance-id); kept stable.
      type: str
    interfaces:
      description: The NICs as recorded in etcd, C({network, mac, ip}).
      type: list
      elements: dict
    ips:
      description: The IP of each NIC.
      type: list
      elements: str
    macs:
      description: The MAC of each NIC.
      type: list
      elements: str
    disks:
      description: Paths of the root disk, ephemeral disks and seed.
      type: list
      elements: str
    console_log:
      description: File the serial console is logged to.
      type: str
    hostname:
      description: Guest hostname.
      type: str
    metadata:
      description: The instance's O(metadata).
      type: dict
    security_groups:
      description: The instance's O(security_groups).
      type: list
      elements: str
    ssh_after:
      description: With O(wait_for=ssh), seconds until the guest answered SSH.
      type: float
      returned: when O(wait_for=ssh) and the instance is running
    changed:
      description: Whether this instance changed.
      type: bool
    needs_restart:
      description: The definition changed while the guest runs; it applies after the guest restarts.
      type: bool
    actions:
      description: What was done to this instance (or would be in check mode).
      type: list
      elements: str
  sample:
    - name: web1
      host: hv1
      state: running
      ips: [10.0.0.10]
      macs: ["02:73:63:0a:1b:2c"]
      console_log: /var/lib/smallcloud/instances/web1/console.log
      needs_restart: false
name:
  description: With O(name), the instance's keys (RV(instances[].state), RV(instances[].ips), ...) at the top too.
  returned: when O(name) is given
  type: str
needs_restart:
  description: With O(name), whether the instance needs a restart to apply its definition.
  returned: when O(name) is given and state is not absent
  type: bool
actions:
  description: 'What was done, or would be done in check mode (C(NAME: action) in a batch).'
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instances import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
