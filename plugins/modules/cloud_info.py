#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: cloud_info
short_description: What etcd records about the cloud next to what this host runs, with differences flagged
description:
  - Reads the records of networks, instances and floating IPs (and optionally the event logs) from etcd,
    and the libvirt domains and network bridges of this host.
  - Lists in RV(differences) every disagreement that concerns this host, for example an instance recorded
    here whose domain is not defined, a recorded state or MAC that the domain does not have, a smallcloud
    domain without a record, or a network that instances here use whose bridge is missing.
  - Changes nothing.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes.info_module
  - smallcloud.kvm.etcd
  - smallcloud.kvm.libvirt
  - smallcloud.kvm.host_paths.namespace
  - smallcloud.kvm.host_paths.sysfs
options:
  events:
    description: Also return the event logs (C(events/KIND/NAME/...)).
    type: bool
    default: false
notes:
  - Supports check mode; it never changes anything.
requirements:
  - libvirt-python
"""

EXAMPLES = r"""
- name: Compare the cloud's records with this hypervisor
  smallcloud.kvm.cloud_info:
  register: cloud

- name: Fail when records and host disagree
  ansible.builtin.assert:
    that: cloud.differences | length == 0
    fail_msg: "{{ cloud.differences }}"
"""

RETURN = r"""
host:
  description: This host's name, as instance records name it.
  returned: always
  type: str
networks:
  description: Network records by name, each with C(bridge) and C(bridge_present) (on this host) added.
  returned: always
  type: dict
instances:
  description: Instance records by name (all hosts).
  returned: always
  type: dict
floating:
  description: Floating IP allocations, C(POOL/ADDRESS) -> record.
  returned: always
  type: dict
floating_ips:
  description: Floating IP records by address, each C({address, pool, network, instance, fixed_ip}).
  returned: always
  type: dict
security_groups:
  description: Security group records by name, each C({name, description, rules}) (M(smallcloud.kvm.security_group)).
  returned: always
  type: dict
domains:
  description: libvirt domains of this host by name, with C(managed), C(state), C(macs) and C(bridges).
  returned: always
  type: dict
hosts:
  description:
    - Registered hypervisors by name (M(smallcloud.kvm.host)), each record with C(reserved) (the vCPUs, memory
      and disk placed there), C(free) (capacity times the allocation ratio, less what is reserved; the cloud-wide
      default ratios) and C(placed) (the names of its instances).
  returned: always
  type: dict
  sample:
    hv1:
      state: active
      capacity: {vcpus: 8, memory_mb: 32768, disk_gb: 900}
      reserved: {vcpus: 2, memory_mb: 1024, disk_gb: 20}
      free: {vcpus: 30.0, memory_mb: 31744.0, disk_gb: 880.0}
      placed: [web1, web2]
placements:
  description: Where each instance is placed and why (M(smallcloud.kvm.placement)), with what it reserved.
  returned: always
  type: dict
  sample:
    web1: {host: hv1, reason: "most free memory (31232 MiB after it) of 3 fitting active hosts", vcpus: 1,
           memory_mb: 512, disk_gb: 10, affinity: null, anti_affinity: web, time: "2026-12-01T02:03:04.000005Z"}
differences:
  description: Each disagreement between the records and this host, C({kind, name, problem}).
  returned: always
  type: list
  elements: dict
  sample:
    - kind: instance
      name: web1
      problem: recorded running but stopped
events:
  description: Event logs, C(KIND/NAME/STAMP) -> C({time, message}).
  returned: when O(events=true)
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.views.cloud_view import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
