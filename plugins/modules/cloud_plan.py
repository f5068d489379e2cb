#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: cloud_plan
short_description: What converging this host would change, asked in one module call
description:
  - Runs M(smallcloud.kvm.image), M(smallcloud.kvm.network), M(smallcloud.kvm.instance) and
    M(smallcloud.kvm.floating_ip) in check mode, in one process, for the options given. Each entry is
    validated against its own module's options and planned by that module's own code.
  - Changes nothing. RV(would_change) says whether any of them would change something, RV(changes) what.
  - The entries are checked in the role's order (security groups, images, networks, instances, floating IPs) up
    to the first that would change something. Later ones are not checked, as their check may depend on that
    change (an instance on a network the converge would create first).
  - The cloud role asks it first on every host and skips its converge tasks when no host would change
    anything, so a re-converge of an unchanged cloud costs one module call per host.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes.info_module
  - smallcloud.kvm.etcd
options:
  security_groups:
    description:
      - Options of M(smallcloud.kvm.security_group), one dict per group; the etcd options default to this module's.
    type: list
    elements: dict
    default: []
  images:
    description: Options of M(smallcloud.kvm.image), one dict per image.
    type: list
    elements: dict
    default: []
  networks:
    description:
      - Options of M(smallcloud.kvm.network), one dict per network; the etcd options default to this module's.
    type: list
    elements: dict
    default: []
  instances:
    description:
      - Options of one M(smallcloud.kvm.instance) call (usually with its O(smallcloud.kvm.instance#module:instances)
        list); the etcd options default to this module's.
    type: dict
  floating_ips:
    description:
      - Options of M(smallcloud.kvm.floating_ip), one dict per floating IP; the etcd options default to this
        module's.
    type: list
    elements: dict
    default: []
  placement:
    description:
      - The placement of every declared instance (M(smallcloud.kvm.placement), previewed). When given, the
        instance call's batch is the instances placed on O(placement.host); a host of O(placement.hosts) not
        registered yet, or an instance not placed yet, is a change.
    type: dict
    suboptions:
      instances:
        description: Every declared instance, as M(smallcloud.kvm.placement) takes them.
        type: list
        elements: dict
        required: true
      host:
        description: This host's name in the host registry.
        type: str
        required: true
      hosts:
        description: The hosts of the play, which the converge registers before it places.
        type: list
        elements: str
        required: true
      first_host:
        description: Where an instance to remove that is nowhere is looked for.
        type: str
        required: true
      cpu_allocation_ratio:
        description: As in M(smallcloud.kvm.placement).
        type: raw
        default: 4.0
      memory_allocation_ratio:
        description: As in M(smallcloud.kvm.placement).
        type: raw
        default: 1.0
      disk_allocation_ratio:
        description: As in M(smallcloud.kvm.placement).
        type: raw
        default: 1.0
notes:
  - Supports check mode; it never changes anything.
  - An entry that its module would refuse fails this module with the same message, prefixed with its kind and
    index (for example C(networks[1])).
requirements:
  - what the four modules need (libvirt-python, pyroute2, etcd3gw)
"""

EXAMPLES = r"""
- name: Would this host change anything?
  smallcloud.kvm.cloud_plan:
    networks:
      - name: web
        cidr: 10.0.0.0/24
    instances:
      instances:
        - name: web1
          image: debian:12
          networks: [web]
  register: plan

- name: Say what
  ansible.builtin.debug:
    var: plan.changes
  when: plan.would_change
"""

RETURN = r"""
would_change:
  description: Whether converging with these options would change anything on this host or in etcd.
  returned: always
  type: bool
changes:
  description: The first module call that would change something, with the steps it would take (empty when none).
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: C(hosts), C(placement), C(security_groups), C(images), C(networks), C(instances) or
        C(floating_ips).
      type: str
    name:
      description: The image URL or name, the network's name, or the floating IP's network and target.
      type: str
    actions:
      description: What that module would do.
      type: list
      elements: str
  sample:
    - kind: networks
      name: web
      actions: ["start dnsmasq in scnet-a1"]
placements:
  description:
    - With O(placement), where each declared instance is or would be placed, as M(smallcloud.kvm.placement)
      returns it.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.views.cloud_plan import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
