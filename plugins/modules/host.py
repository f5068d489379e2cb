#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: host
short_description: Register a hypervisor in the cloud's host registry in etcd
description:
  - Records this hypervisor in etcd as C(hosts/NAME) = C({name, hostname, underlay_interface, underlay_address,
    virt_type, state, capacity, allocation_ratios}), so that the other hypervisors can build their VXLAN meshes
    from the registry and M(smallcloud.kvm.placement) can choose hosts for instances.
  - C(capacity) is what the host offers, read on every run (C(vcpus) the CPUs this process may run on,
    C(memory_mb) the memory, C(disk_gb) the size of the file system of O(instances_dir)).
  - "C(state) is V(active) for a new record; O(status) sets it: V(draining) and V(drained) hosts get no new
    placement."
  - The underlay (interface and its first IPv4 address) is read from the host, in O(host_netns) when given;
    an interface that does not exist or has no IPv4 address fails the task, naming it.
  - An existing record is updated only where it differs; its C(state) (V(active) for a new record) is kept,
    and so is its C(virt_type) when O(virt_type) is not given.
  - With O(state=absent) the record is removed; this is refused, naming them, while instance records still
    place instances on the host (their C(host) is the record's C(hostname) or O(name)), or while
    M(smallcloud.kvm.placement) has capacity reserved there. Removing a host that
    is not registered is not an error.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
  - smallcloud.kvm.host_paths.host_netns
options:
  name:
    description:
      - Name of the host in the registry, 1-63 letters, digits, C(.), C(_) or C(-), starting with a letter or digit.
      - Default this machine's host name.
    type: str
  state:
    description: Whether the host is registered.
    type: str
    choices: [present, absent]
    default: present
  underlay_interface:
    description:
      - Interface that reaches the other hypervisors; its first IPv4 address becomes the host's VXLAN endpoint.
      - Default the device of the IPv4 default route.
    type: str
  virt_type:
    description:
      - Domain type the host runs guests with, V(kvm) or V(qemu) (TCG).
      - When not given, the recorded value is kept (none for a new record).
    type: str
    choices: [kvm, qemu]
  status:
    description:
      - The host's state for placement. V(active) takes new instances, V(draining) and V(drained) take none.
      - When not given, the recorded state is kept (V(active) for a new record).
    type: str
    choices: [active, draining, drained]
  instances_dir:
    description: Directory of the instances' disks; the size of its file system is the host's disk capacity.
    type: path
    default: /var/lib/smallcloud/instances
  cpu_allocation_ratio:
    description:
      - This host's vCPUs placed per CPU, over the cloud-wide default of M(smallcloud.kvm.placement). A number >= 1.
      - When not given, the recorded value is kept (none for a new record).
    type: raw
  memory_allocation_ratio:
    description: This host's memory placed per MiB, over the cloud-wide default. A number >= 1.
    type: raw
  disk_allocation_ratio:
    description: This host's disk placed per GiB, over the cloud-wide default. A number >= 1.
    type: raw
requirements:
  - pyroute2 (Debian python3-pyroute2)
notes:
  - Supports check mode and diff mode (the record, field by field once it exists).
"""

EXAMPLES = r"""
- name: Register this hypervisor, its underlay taken from the default route
  smallcloud.kvm.host:
    virt_type: "{{ hypervisor_virt_type }}"

- name: Register it under another name, on a given underlay interface
  smallcloud.kvm.host:
    name: hv1
    underlay_interface: ens4

- name: Take no new instances on it, and let it overcommit CPUs 8 to 1
  smallcloud.kvm.host:
    name: hv1
    status: draining
    cpu_allocation_ratio: 8

- name: Retire it (refused while instances are placed on it)
  smallcloud.kvm.host:
    name: hv1
    state: absent
"""

RETURN = r"""
host:
  description: The host's record after the run (what it would be in check mode); null with O(state=absent).
  returned: always
  type: dict
  sample:
    name: hv1
    hostname: hv1.example.org
    underlay_interface: ens4
    underlay_address: 10.0.0.11
    virt_type: kvm
    state: active
    capacity: {vcpus: 8, memory_mb: 32768, disk_gb: 900}
    allocation_ratios: {cpu_allocation_ratio: 8}
actions:
  description: What was done (or would be done in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.hosts import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
