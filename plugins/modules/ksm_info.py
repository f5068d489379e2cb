#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: ksm_info
short_description: Report kernel samepage merging (KSM) settings, counters and savings
version_added: 0.1.0
description:
  - Reads every file of C(/sys/kernel/mm/ksm) and adds what an operator wants to know from them, namely
    memory saved in bytes, the sharing ratio, full scans and whether KSM is running.
  - On a kernel without KSM it returns RV(ksm.available=false) instead of failing.
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes.info_module
  - smallcloud.kvm.host_paths.sysfs
seealso:
  - module: smallcloud.kvm.ksm
"""

EXAMPLES = r"""
- name: Read KSM figures
  smallcloud.kvm.ksm_info:
  register: ksm

- name: Show what KSM saves
  ansible.builtin.debug:
    msg: "KSM saves {{ ksm.ksm.memory_saved_bytes | human_readable }} (ratio {{ ksm.ksm.sharing_ratio }})"
"""

RETURN = r"""
ksm:
  description: KSM as the kernel reports it, plus derived figures.
  returned: always
  type: dict
  contains:
    available:
      description: Whether the kernel has KSM (C(CONFIG_KSM)).
      type: bool
      sample: true
    reason:
      description: Why KSM is not available.
      type: str
      returned: when O(sysfs_root) has no KSM directory
    path:
      description: The KSM directory read.
      type: str
      sample: /sys/kernel/mm/ksm
    run:
      description: The scanner's state, V(stopped), V(running) or V(unmerge).
      type: str
      sample: running
    running:
      description: Whether C(ksmd) is scanning now.
      type: bool
      sample: true
    settings:
      description: Every writable file of the directory, as numbers (choice files as the selected word).
      type: dict
      sample: {pages_to_scan: 100, sleep_millisecs: 20, advisor_mode: none}
    counters:
      description: Every read-only counter of the directory the kernel has.
      type: dict
      sample: {pages_shared: 1200, pages_sharing: 9800, full_scans: 4, pages_volatile: 12}
    page_size:
      description: The host's page size in bytes.
      type: int
      sample: 4096
    memory_saved_bytes:
      description: Memory KSM saves, C(pages_sharing) times the page size.
      type: int
      sample: 40140800
    zero_pages_bytes:
      description: Memory of empty pages merged into the zero page (C(ksm_zero_pages) times the page size).
      type: int
      sample: 0
    sharing_ratio:
      description:
        - C(pages_sharing) per C(pages_shared); high means many sharers per merged page.
        - 0 when nothing is merged.
      type: float
      sample: 8.167
    full_scans:
      description: How many times C(ksmd) has scanned all mergeable memory.
      type: int
      sample: 4
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.ksm_info import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
