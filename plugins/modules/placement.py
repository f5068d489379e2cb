#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: placement
short_description: Choose a hypervisor for each instance and reserve its capacity there, in etcd
description:
  - Gives every instance of O(instances) a host among the hypervisors registered with M(smallcloud.kvm.host),
    and reserves its vCPUs, memory and disk on that host. Each placement is one etcd transaction that fails if
    the host's reservations or record changed since they were read, and is then chosen again; controllers
    placing at the same time therefore never overbook a host.
  - "The choice: hosts whose state is V(active) and whose free capacity holds the instance (capacity times the
    allocation ratio, less what is reserved); none that already holds a member of the instance's
    C(anti_affinity) group (hard); those holding a member of its C(affinity) group first (soft); then the host
    with the most free memory, so that instances spread."
  - An instance with C(host) is pinned there, whatever the free capacity (it is still reserved); the host must be
    registered and V(active).
  - A placed instance never moves, also when capacity changed since; a C(host) that differs from its placement
    is refused. An instance that already runs but has no placement (made before placement existed) is adopted
    where it runs.
  - The batch is previewed first; an instance that fits nowhere fails the task before anything is reserved,
    naming the instance, what it asks for and the best host's free capacity.
  - Instances with C(state=absent) are not placed; their current host is reported. The reservation is released
    when M(smallcloud.kvm.instance) removes the instance.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
options:
  instances:
    description:
      - The instances to place, as the cloud role declares them. Each entry takes the options of
        M(smallcloud.kvm.instance) (only C(name), C(cpus), C(memory), C(disk_size), C(ephemeral_disks) and
        C(state) matter here) and C(host), C(affinity), C(anti_affinity).
      - C(host) pins the instance to that registered host.
      - C(anti_affinity) names a group whose members must run on different hosts; C(affinity) a group whose
        members should run on the same host when it fits. Group names follow the rules of instance names.
      - The disk reserved is C(disk_size) plus the C(ephemeral_disks), rounded up to GiB; an instance without
        C(disk_size) reserves only its ephemeral disks, as its root disk is a thin overlay of the image.
    type: list
    elements: dict
    required: true
  cpu_allocation_ratio:
    description:
      - vCPUs placed per CPU of a host, unless its record sets its own (M(smallcloud.kvm.host)). A number >= 1.
    type: raw
    default: 4.0
  memory_allocation_ratio:
    description:
      - Memory placed per MiB of a host, unless its record sets its own. A number >= 1; 1 (the default) is no
        overcommit, as guest memory is really used.
    type: raw
    default: 1.0
  disk_allocation_ratio:
    description: Disk placed per GiB of the host's instances file system, unless its record sets its own.
    type: raw
    default: 1.0
notes:
  - Supports check mode (the placements are previewed, nothing is reserved).
  - Hosts are named as registered (the deploy playbook registers each by its inventory name).
"""

EXAMPLES = r"""
- name: Place the web servers on different hosts, the cache next to the first
  smallcloud.kvm.placement:
    instances:
      - {name: web1, cpus: 2, memory: 2048, disk_size: 20G, anti_affinity: web}
      - {name: web2, cpus: 2, memory: 2048, disk_size: 20G, anti_affinity: web}
      - {name: cache, memory: 4096, affinity: web}
  run_once: true
  register: placed

- name: Pin one instance, with more overcommit of CPUs
  smallcloud.kvm.placement:
    instances:
      - {name: build, cpus: 8, host: hv2}
    cpu_allocation_ratio: 8
"""

RETURN = r"""
placements:
  description: Where each instance is (or would be, in check mode) and why.
  returned: always
  type: dict
  sample:
    web1: {host: hv1, reason: "most free memory (22528 MiB after it) of 3 fitting active hosts", new: true}
    web2: {host: hv2, reason: "most free memory (22528 MiB after it) of 2 fitting active hosts", new: true}
actions:
  description: The placements made (or that would be made in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placing import MODULE_SPEC, run


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
