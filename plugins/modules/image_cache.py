#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: image_cache
short_description: List, verify and prune the image cache of a hypervisor
version_added: 0.1.0
description:
  - Lists the entries of the cache that M(smallcloud.kvm.image) fills, with their sizes and the total.
  - Checks every entry's size against its metadata; with O(verify) also recomputes the sha256 of each
    cached file and compares it with the digest recorded when it was fetched. Entries that fail are
    reported as corrupt and, with O(remove_corrupt), removed.
  - Removes entries unused for longer than O(max_age), and entries listed in O(remove).
  - Never removes an entry that an instance disk under O(instance_dirs) has in its backing chain
    (C(qemu-img info --backing-chain)); such entries are reported in RV(kept).
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.host_paths.image_cache
options:
  verify:
    description:
      - Recompute the sha256 of every cached file and compare it with its metadata (reads every image).
    type: bool
    default: false
  remove_corrupt:
    description:
      - Remove entries found corrupt (missing file or metadata, wrong size, and with O(verify) wrong digest).
    type: bool
    default: false
  max_age:
    description:
      - Remove entries not used for longer than this, as a number with an optional unit
        C(s), C(m), C(h), C(d) or C(w) (for example C(30d)); a plain number is seconds.
      - Use counts from the last run of M(smallcloud.kvm.image) for the entry.
      - Unset keeps entries regardless of age.
    type: str
  instance_dirs:
    description:
      - Directories searched (recursively) for qcow2 instance disks; an entry in any disk's backing
        chain is in use and is never removed. Directories that do not exist are skipped.
    type: list
    elements: path
    default: [/var/lib/smallcloud/instances, /var/lib/libvirt/images]
  remove:
    description:
      - Keys of entries to remove (RV(entries[].key)); removing an entry in use is an error.
    type: list
    elements: str
    default: []
notes:
  - Check mode reports what would be removed and removes nothing.
  - Supports C(--diff) (the entry file names before and after).
requirements:
  - qemu-img (Debian package C(qemu-utils))
seealso:
  - module: smallcloud.kvm.image
"""

EXAMPLES = r"""
- name: Show the cache
  smallcloud.kvm.image_cache:
  register: cache

- name: Verify every image and drop the corrupt ones
  smallcloud.kvm.image_cache:
    verify: true
    remove_corrupt: true

- name: Drop images nobody used for a month and no instance needs
  smallcloud.kvm.image_cache:
    max_age: 30d
    instance_dirs:
      - /var/lib/smallcloud/instances
"""

RETURN = r"""
entries:
  description: Every cache entry as found before any removal.
  returned: always
  type: list
  elements: dict
  contains:
    key:
      description: Cache key (sha256 of the URL); use it in O(remove).
      type: str
    path:
      description: Path of the cached image.
      type: str
    url:
      description: Source URL recorded in the metadata.
      type: str
    format:
      description: Format of the cached file.
      type: str
    size:
      description: Size in bytes recorded in the metadata.
      type: int
    disk_usage:
      description: Bytes the file occupies on disk.
      type: int
    virtual_size:
      description: Virtual disk size in bytes.
      type: int
    last_used:
      description: Unix time of the last use by M(smallcloud.kvm.image).
      type: int
    age:
      description: Seconds since the last use.
      type: int
    status:
      description: C(ok) or C(corrupt).
      type: str
    problem:
      description: Why the entry is corrupt, or null.
      type: str
    verified:
      description: Whether the digest was recomputed in this run.
      type: bool
    in_use_by:
      description: Instance disks whose backing chain includes this image.
      type: list
      elements: str
count:
  description: Number of entries.
  returned: always
  type: int
total_size:
  description: Sum of the entries' sizes in bytes.
  returned: always
  type: int
total_disk_usage:
  description: Sum of the bytes the entries occupy on disk.
  returned: always
  type: int
corrupt:
  description: Keys of the corrupt entries.
  returned: always
  type: list
  elements: str
removed:
  description: Entries removed (or that would be, in check mode), with key, path, url and reason.
  returned: always
  type: list
  elements: dict
kept:
  description: Entries that qualified for removal but back an instance disk, with key, url and reason.
  returned: always
  type: list
  elements: dict
actions:
  description: What was done, or would be done in check mode.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.image.image_cache import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
