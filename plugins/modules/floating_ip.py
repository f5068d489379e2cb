#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: floating_ip
short_description: Map an outside address onto a guest's fixed address (DNAT/SNAT) on the network's gateway
description:
  - Allocates an address of the outside O(pool) in etcd (or takes O(address)) and maps it one-to-one onto a
    guest's fixed address on O(network), in that network's gateway namespace (see M(smallcloud.kvm.network)).
  - Inbound, a DNAT rule in chain C(floating_dnat) of the namespace's C(table ip smallcloud) sends the
    address to the fixed IP; outbound, an SNAT rule in chain C(floating_snat) gives the guest the floating
    address. The address sits on the namespace's C(wan) and the host routes it to C(ve-<vni hex>), so it is
    reached from the outside as soon as the pool is routed to this host.
  - Runs on the network's gateway host; the network must have O(smallcloud.kvm.network#module:nat=true).
  - Records C(floating_ips/ADDRESS) = C({address, pool, network, instance, fixed_ip}) in etcd.
  - With O(state=absent) the rules, address, route, record and allocation are removed; a floating IP that is
    already gone is not an error.
  - With O(prune=true) every floating IP whose network or instance no longer exists is released, each under
    its network's lock (the whole prune under the C(floating-prune) lock).
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
  - smallcloud.kvm.host_paths.host_netns
  - smallcloud.kvm.host_paths.namespace
options:
  pool:
    description:
      - Outside IPv4 CIDR the address comes from (usually the network's O(smallcloud.kvm.network#module:egress_pool)).
      - Required with O(state=present); with O(prune=true) it limits pruning to that pool.
    type: str
  network:
    description: Name of the network the guest is on. Required with O(state=present).
    type: str
  instance:
    description: Instance whose address on O(network) (from its C(instances/NAME) record) is the target.
    type: str
  fixed_ip:
    description: The target address on O(network), instead of O(instance).
    type: str
  address:
    description:
      - The floating address. Allocated from O(pool) when omitted; a re-run finds the one already held by the
        same O(network) and O(instance)/O(fixed_ip).
    type: str
  state:
    description: Whether the floating IP should exist.
    type: str
    choices: [present, absent]
    default: present
  prune:
    description:
      - Release every floating IP whose network or instance no longer exists.
      - Other options but O(pool) are then ignored.
    type: bool
    default: false
requirements:
  - pyroute2 (Debian python3-pyroute2)
  - iproute2, nftables
notes:
  - Supports check mode and diff mode (record, rules, addresses).
"""

EXAMPLES = r"""
- name: A floating IP for web1
  smallcloud.kvm.floating_ip:
    pool: 192.0.2.0/24
    network: web
    instance: web1
  register: fip

- name: Release it
  smallcloud.kvm.floating_ip:
    address: "{{ fip.address }}"
    state: absent

- name: Release floating IPs of deleted instances and networks
  smallcloud.kvm.floating_ip:
    prune: true
"""

RETURN = r"""
address:
  description: The floating address (null in check mode before it is allocated).
  returned: always
  type: str
fixed_ip:
  description: The guest address it maps to.
  returned: when known
  type: str
network:
  description: The network of the guest.
  returned: when known
  type: str
namespace:
  description: The gateway namespace holding the rules.
  returned: state=present
  type: str
pool:
  description: The pool CIDR, normalised.
  returned: state=present
  type: str
pruned:
  description: Addresses released by O(prune=true).
  returned: prune=true
  type: list
  elements: str
actions:
  description: What was done (or would be done in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.floating_ips import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
