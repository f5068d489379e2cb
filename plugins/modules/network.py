#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: network
short_description: A cloud network as VXLAN + bridge on each hypervisor, with gateway, DHCP and NAT on one
description:
  - Converges one virtual network of the cloud on this host and records it in etcd under C(networks/NAME).
  - On every host carrying the network it keeps a unicast VXLAN interface C(vx-<vni hex>) (no multicast group)
    enslaved to a bridge C(br-<vni hex>), with one all-zero-MAC FDB entry per peer (head-end replication),
    never one to this host itself; peers are added and removed to match.
  - On the gateway host it also keeps a network namespace C(<namespace_prefix><vni hex>) joined to the bridge
    by a veth (C(vg-<vni hex>) on the bridge, C(lan) inside) that holds the gateway address (the first host of
    O(cidr)), dnsmasq serving static leases, and with O(nat) an egress veth (C(ve-<vni hex>) on the host,
    C(wan) inside) with NAT in the namespace's own nftables table C(ip smallcloud).
  - The outside is whatever the host routes to; the egress address (from O(egress_pool)) and floating
    addresses are routed by this host to C(ve-<vni hex>), so the uplink router must route O(egress_pool) to
    this host.
  - 'DHCP leases are static, taken from the instances recorded in etcd. An instance is attached to a network
    by a record C(instances/NAME) of the form
    C({"name": NAME, "interfaces": [{"network": NETWORK, "mac": "02:73:63:00:00:01", "ip": "10.0.0.5"}]}).'
  - dnsmasq gets SIGHUP when the leases change.
  - A re-run repairs drift (deleted links, a killed dnsmasq, missing rules or addresses) and lists what it did
    in RV(actions).
  - With O(state=absent) everything this host has for the network is removed; the last host to leave also
    deletes the etcd record and frees the VNI, the egress address and the network's addresses. Refused while
    instances are attached.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
  - smallcloud.kvm.host_paths.host_netns
  - smallcloud.kvm.host_paths.namespace
  - smallcloud.kvm.host_paths.network_state
options:
  name:
    description: Name of the network (1-63 letters, digits, C(.), C(_) or C(-)).
    type: str
    required: true
  state:
    description: Whether the network should exist on this host.
    type: str
    choices: [present, absent]
    default: present
  cidr:
    description:
      - IPv4 network of the guests, for example C(10.0.0.0/24); prefix length at most 29.
      - Must not overlap another network of the cloud; cannot change once the network exists.
      - Required with O(state=present).
    type: str
  vni:
    description:
      - VXLAN id (1..16777215). When omitted a free one is allocated in etcd.
      - Interface names derive from it, so it cannot change once the network exists.
    type: int
  mtu:
    description: MTU of the guests' network; default the underlay interface's MTU minus 50 (VXLAN overhead).
    type: int
  dhcp:
    description: Run dnsmasq in the gateway namespace with static leases for the recorded instances.
    type: bool
    default: true
  dns:
    description:
      - The gateway answers DNS on its address and DHCP hands it out as the guests' resolver. It answers
        the hostnames of the network's instances (the first label of each instance's C(hostname)) and
        forwards other names to the resolvers in the gateway namespace's C(resolv.conf) (the host's, or
        C(/etc/netns/NAMESPACE/resolv.conf)), which are reachable from there with O(nat=true).
      - Served by the gateway's dnsmasq, so it needs O(dhcp=true). Ignored when O(dns_servers) is set.
      - V(false) hands out no DNS server at all, as before this option existed.
    type: bool
    default: true
  dns_servers:
    description:
      - DNS servers handed out by DHCP instead of the gateway; the gateway then answers no DNS.
      - Empty means the gateway when O(dns=true), else none.
    type: list
    elements: str
    default: []
  nat:
    description:
      - Give the network egress to the outside through this host, masqueraded to the network's egress
        address. Needed for floating IPs.
    type: bool
    default: false
  egress_pool:
    description:
      - Outside IPv4 CIDR routed to this host that the network's egress address comes from (usually the
        floating IP pool). Required with O(nat=true) on the gateway host.
    type: str
  egress_address:
    description: A specific egress address from O(egress_pool); allocated when omitted.
    type: str
  gateway:
    description:
      - Whether this host carries the network's namespace (gateway address, DHCP, NAT) or only VXLAN and bridge.
      - Only one host per network can be the gateway.
    type: bool
    default: true
  underlay_interface:
    description:
      - Interface whose first IPv4 address carries VXLAN (this host's VTEP address).
      - Default the device of the IPv4 default route.
    type: str
  mesh_peers:
    description:
      - Underlay addresses of the other hosts carrying this network.
      - Default the hosts of O(mesh_hosts), else the hosts recorded in the network's etcd record.
    type: list
    elements: str
  mesh_hosts:
    description:
      - Names of the hypervisors that carry this network, as registered in etcd by M(smallcloud.kvm.host)
        (the hypervisor role registers each host under its inventory name). This host floods to the
        underlay addresses of all of them, including those that have not converged the network yet, and
        the network's record forgets hosts that are no longer listed (a hypervisor gone for good).
      - A host that is not registered is left out (it carries no guest); the C(smallcloud.kvm.deploy) playbook
        registers every hypervisor, and the M(smallcloud.kvm.cloud) role passes its hypervisors as this list.
    type: list
    elements: str
  departing_instances:
    description:
      - With O(state=absent) in check mode only, instances that an earlier task of the same run deletes.
        Check mode only previews that deletion, so their records still name the network; these names then
        do not block the preview of its removal.
      - Outside check mode they must be gone by then; an instance record still there when the removal is applied
        blocks O(state=absent) before anything is changed.
    type: list
    elements: str
    default: []
requirements:
  - pyroute2 (Debian python3-pyroute2)
  - iproute2, nftables, dnsmasq
notes:
  - Supports check mode and diff mode (VNI, peers, addresses, rules, leases, etcd record).
"""

EXAMPLES = r"""
- name: A network with DHCP and NAT on the network node
  smallcloud.kvm.network:
    name: web
    cidr: 10.10.0.0/24
    underlay_interface: eth1
    nat: true
    egress_pool: 192.0.2.0/24
    dns_servers: [192.0.2.53]

- name: The same network on a compute-only hypervisor
  smallcloud.kvm.network:
    name: web
    cidr: 10.10.0.0/24
    underlay_interface: eth1
    gateway: false

- name: Remove it
  smallcloud.kvm.network:
    name: web
    state: absent
"""

RETURN = r"""
vni:
  description: VXLAN id of the network (null in check mode before it is allocated).
  returned: always
  type: int
bridge:
  description: Name of the bridge guests attach to.
  returned: when the network exists
  type: str
vxlan:
  description: Name of the VXLAN interface.
  returned: state=present
  type: str
namespace:
  description: Name of the gateway namespace (null on a host that is not the gateway).
  returned: when the network exists
  type: str
gateway_ip:
  description: The gateway address (first host of the CIDR).
  returned: state=present
  type: str
dhcp_range:
  description: First and last address guests can get, as C(first-last).
  returned: state=present
  type: str
mtu:
  description: MTU of the network.
  returned: state=present
  type: int
peers:
  description: Underlay addresses this host floods the network's traffic to.
  returned: state=present
  type: list
  elements: str
egress_address:
  description: The network's outside (SNAT) address when O(nat=true).
  returned: state=present
  type: str
actions:
  description: What was done (or would be done in check mode), including repairs.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.networks import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
