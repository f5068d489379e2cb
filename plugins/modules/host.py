#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: host
short_description: Register a hypervisor in the cloud's host registry in etcd
description:
  - Records this hypervisor in etcd as C(hosts/NAME) = C({name, hostname, underlay_interface, underlay_address,
    virt_type, state}), so that the other hypervisors can build their VXLAN meshes from the registry.
  - The underlay (interface and its first IPv4 address) is read from the host, in O(host_netns) when given;
    an interface that does not exist or has no IPv4 address fails the task, naming it.
  - An existing record is updated only where it differs; its C(state) (V(active) for a new record) is kept,
    and so is its C(virt_type) when O(virt_type) is not given.
  - With O(state=absent) the record is removed; this is refused, naming them, while instance records still
    place instances on the host (their C(host) is the record's C(hostname) or O(name)). Removing a host that
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
