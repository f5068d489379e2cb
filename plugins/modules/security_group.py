#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: security_group
short_description: Named sets of firewall rules that instances take, recorded in etcd
description:
  - Records the group in etcd as C(security_groups/NAME) = C({name, description, rules}). The rules are the
    whole set, in order; a rule given twice is kept once.
  - Instances take groups by name (the O(smallcloud.kvm.instance#module:security_groups) option). The hypervisor
    that runs an instance enforces its groups statefully with nftables (table C(inet smallcloud_guests)), so
    the rules follow the instance to any host.
  - "Every instance, in a group or not: replies to connections it opened, and traffic from its own network
    (DHCP, DNS, the other instances there), pass; other incoming traffic, a floating IP's included, passes only
    where an ingress rule of one of its groups allows it. Outgoing traffic is open, unless a group of the
    instance has egress rules: then only its own network and what those rules allow."
  - A changed group reaches each hypervisor with the next run of M(smallcloud.kvm.instance) there (the
    converge playbook runs it on every host); no instance restarts.
  - With O(state=absent) the group is removed; refused, naming them, while instances are in it or rules of
    other groups name it.
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
options:
  name:
    description: Name of the group, 1-63 letters, digits, C(.), C(_) or C(-), starting with a letter or digit.
    type: str
    required: true
  state:
    description: Whether the group exists.
    type: str
    choices: [present, absent]
    default: present
  description:
    description: Free text kept with the group.
    type: str
    default: ""
  rules:
    description:
      - The group's rules, each allowing one kind of traffic. At most 100.
    type: list
    elements: dict
    default: []
    suboptions:
      direction:
        description: V(ingress) allows traffic to the instance, V(egress) from it.
        type: str
        choices: [ingress, egress]
        default: ingress
      protocol:
        description: The IP protocol; V(any) matches every protocol.
        type: str
        choices: [tcp, udp, icmp, any]
        default: any
      port:
        description:
          - Destination port, 1-65535, or a range C(FIRST-LAST) such as C(8000-8080). Only with V(tcp) or V(udp).
          - Not given, every port.
        type: raw
      cidr:
        description:
          - The remote side (the source of ingress, the destination of egress) as an IPv4 network.
          - Default C(0.0.0.0/0) (anywhere) unless O(rules[].group) is given.
        type: str
      group:
        description:
          - The remote side as another group (or this one) - every address of its instances, on any host.
          - The group must exist. Mutually exclusive with O(rules[].cidr).
        type: str
notes:
  - Supports check mode and diff mode (the record before and after).
  - Concurrent runs that write the same group agree; a run that finds the group changed by another run since
    it read it fails and changes nothing.
"""

EXAMPLES = r"""
- name: Web servers answer HTTP(S) from anywhere, SSH from the office, ping from anywhere
  smallcloud.kvm.security_group:
    name: web
    description: public web servers
    rules:
      - {protocol: tcp, port: 80}
      - {protocol: tcp, port: 443}
      - {protocol: tcp, port: 22, cidr: 198.51.100.0/24}
      - {protocol: icmp}

- name: Databases answer only the web servers, and reach nothing outside their network but the backup host
  smallcloud.kvm.security_group:
    name: db
    rules:
      - {protocol: tcp, port: 5432, group: web}
      - {direction: egress, protocol: tcp, port: 873, cidr: 192.0.2.10/32}

- name: An instance in both
  smallcloud.kvm.instance:
    name: web1
    image: debian:12
    networks: [tenant]
    security_groups: [web]

- name: Remove a group (refused while instances are in it)
  smallcloud.kvm.security_group:
    name: db
    state: absent
"""

RETURN = r"""
security_group:
  description: The group's record after the run (what it would be in check mode); null with O(state=absent).
  returned: always
  type: dict
  sample:
    name: web
    description: public web servers
    rules:
      - {direction: ingress, protocol: tcp, ports: "80", cidr: 0.0.0.0/0, group: null}
      - {direction: ingress, protocol: tcp, ports: "5432", cidr: null, group: web}
actions:
  description: What was done (or would be done in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.security_groups import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
