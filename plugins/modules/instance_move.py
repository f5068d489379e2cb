#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: instance_move
short_description: One step of moving an instance to another hypervisor (the evacuate playbook's steps)
description:
  - "The steps that move an instance off a draining hypervisor with its identity kept (UUID, MACs, IPs, disks).
    The playbook C(smallcloud.kvm.evacuate) runs them in order; each looks before it acts and does only what is
    left, so an evacuation killed at any point is completed by running it again."
  - "V(list): the instances on O(from_host) (by record or placement, and moves from it still in progress)."
  - "V(reserve): the target of O(name), chosen by M(smallcloud.kvm.placement) among the other active hosts and
    reserved there in one etcd transaction that also marks the record C(moving_to); a killed run's target is
    kept. O(from_host) must be draining. From now until V(commit) the instance module refuses the instance."
  - "V(export), on the source host: the guest is shut down (ACPI, forced off after O(shutdown_timeout)) and
    its autostart cleared; returns its inactive domain XML, the files of its directory and the digest its image
    was verified with in O(cache_dir)."
  - "V(import), on the target host, after the files were copied to C(INSTANCES_DIR/.incoming-NAME): they
    become the instance's directory, the root overlay is rebased onto this host's cached copy of the image
    (fetched first if missing, into O(cache_dir)), the domain is defined from O(xml) and started. Done
    already (a domain with the instance's UUID), it only starts it."
  - "V(commit), on the target host: the record (its C(host)), the placement and the source's reservation move
    in one etcd transaction. This is the moment the instance changes hosts."
  - "V(cleanup), on the source host: the domains and directories of instances whose record moved to another
    host (same UUID only) are removed."
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.etcd
  - smallcloud.kvm.libvirt
options:
  step:
    description: The step to run.
    type: str
    required: true
    choices: [list, reserve, export, import, commit, cleanup]
  name:
    description: The instance (all steps except V(list) and V(cleanup)).
    type: str
  from_host:
    description: The host being drained, as registered (V(list) and V(reserve)).
    type: str
  xml:
    description: The domain XML that V(export) returned (V(import)).
    type: str
  source_dir:
    description: The instance's directory on the source host, as V(export) returned it (V(import)).
    type: path
  cache_dir:
    description:
      - This host's image cache (V(export) and V(import)). The instance's image is fetched into it first when
        missing (as M(smallcloud.kvm.instance) fetches it), and the root overlay is rebased onto that copy.
    type: path
    default: /var/lib/smallcloud/images
  image_checksum:
    description:
      - The digest the image is checked against when V(import) fetches it (C(ALGORITHM:HEX) or C(skip)), as
        V(export) returned it from the source's cache; default C(skip).
    type: str
  instances_dir:
    description: Directory of the instances' disks on this host.
    type: path
    default: /var/lib/smallcloud/instances
  shutdown_timeout:
    description: Seconds the guest gets to shut down on ACPI before it is forced off (V(export)).
    type: int
    default: 60
notes:
  - Supports check mode (each step says what it would do).
  - Moving a running guest without stopping it (live migration) is not done; the guest is down between
    V(export) and V(import).
requirements:
  - libvirt-python (Debian python3-libvirt) for V(export), V(import) and V(cleanup)
"""

EXAMPLES = r"""
# Evacuating a host runs every step: ansible-playbook -i inventory smallcloud.kvm.evacuate -e host=hv2
- name: Which instances are still on hv2?
  smallcloud.kvm.instance_move:
    step: list
    from_host: hv2
  register: left
"""

RETURN = r"""
instances:
  description: With V(list), the names of the instances on O(from_host).
  returned: step is list
  type: list
  elements: str
target:
  description: With V(reserve), the host the instance moves to.
  returned: step is reserve
  type: str
moved:
  description: With V(reserve) and V(export), whether the record is already on another host (nothing left to do).
  returned: step is reserve or export
  type: bool
image_checksum:
  description: With V(export), the digest the source's cache verified the image with, or C(skip).
  returned: step is export
  type: str
xml:
  description: With V(export), the inactive domain XML.
  returned: step is export
  type: str
files:
  description: With V(export), the files of the instance's directory (disks, seed, console log).
  returned: step is export
  type: list
  elements: str
removed:
  description: With V(cleanup), the instances whose copy on this host was removed.
  returned: step is cleanup
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.moving import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
