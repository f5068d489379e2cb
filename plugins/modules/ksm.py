#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: ksm
short_description: Tune kernel samepage merging (KSM) on a hypervisor
version_added: 0.1.0
description:
  - Sets the KSM scanner (C(/sys/kernel/mm/ksm)) so that identical guest memory pages are merged.
    QEMU marks guest RAM mergeable, so KSM lets a hypervisor hold more instances of the same image.
  - Only the settings given (directly or through O(preset)) are managed; the others are left alone.
  - The kernel accepts O(merge_across_nodes) and O(max_page_sharing) only while nothing is merged; to change
    them the module unmerges every page (C(run=2)), writes them, and sets C(run) back to O(run) or, when
    O(run) is not given, to what it was.
  - A setting the running kernel does not have fails the task, naming the missing file.
  - "A kernel without KSM at all fails with C(this kernel has no KSM: CONFIG_KSM is not set)."
  - Bad values fail before anything is written.
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.host_paths.sysfs
options:
  run:
    description:
      - State of the KSM scanner, C(ksmd).
      - V(stopped) stops scanning and keeps merged pages; V(running) scans and merges;
        V(unmerge) stops scanning and splits every merged page again.
    type: str
    choices: [stopped, running, unmerge]
  preset:
    description:
      - Named pace of the scanner, O(pages_to_scan) pages every O(sleep_millisecs) ms; O(pages_to_scan) and
        O(sleep_millisecs) given explicitly win over the preset.
      - V(kernel_defaults) is 100 pages every 20 ms, at most 5,000 pages (20 MiB) per second. Cheapest, about 2% of
        one CPU for C(ksmd), and slowest, it merged half of 512 MiB of identical guest memory in 60 s.
      - V(balanced) is 1,000 pages every 20 ms, at most 50,000 pages (200 MiB) per second. About 5% of one CPU;
        it merged all of the same 512 MiB, 90% of it within 26 s.
      - V(aggressive) is 10,000 pages every 10 ms, at most 1,000,000 pages (4 GiB) per second. About 12% of one CPU
        on that workload (it scanned 210,000 pages per second); it merged 90% of the same 512 MiB within 6 s.
        Its cost grows with the mergeable memory there is to rescan; at its full rate it would keep about half a
        CPU busy (an estimate from the measured cost per page).
      - Measured with C(bench/ksm_merge.py) from the collection's source (4 processes x 128 MiB of identical
        mergeable pages, 60 s per preset, 2 shared cores). C(ksmd) scans only while O(run=running).
    type: str
    choices: [aggressive, balanced, kernel_defaults]
  pages_to_scan:
    description: Pages to scan before C(ksmd) sleeps, 0 to 4294967295.
    type: int
  sleep_millisecs:
    description: Milliseconds C(ksmd) sleeps between batches, 0 to 4294967295.
    type: int
  max_page_sharing:
    description:
      - Most sharers of one merged page (the kernel's default is 256); at least 2.
      - Changing it unmerges every page first (see the description).
    type: int
  merge_across_nodes:
    description:
      - Whether pages of different NUMA nodes may be merged.
      - Changing it unmerges every page first (see the description).
    type: bool
  use_zero_pages:
    description: Whether empty pages are merged with the kernel's zero page instead of with each other.
    type: bool
  smart_scan:
    description: Whether C(ksmd) skips pages that did not merge in earlier scans (kernels 6.7 and later).
    type: bool
  persist:
    description:
      - Also write the managed settings to O(persist_path), a C(tmpfiles.d) file that C(systemd-tmpfiles) applies
        at boot, so they survive a reboot. The file is part of C(--check) and C(--diff) like the settings.
      - When false the file is left as it is.
    type: bool
    default: false
  persist_path:
    description: The C(tmpfiles.d) file written when O(persist) is true.
    type: path
    default: /etc/tmpfiles.d/smallcloud-ksm.conf
notes:
  - Needs root on the managed host, as every write to sysfs does.
seealso:
  - module: smallcloud.kvm.ksm_info
  - name: Kernel samepage merging
    description: The kernel's documentation of every KSM file.
    link: https://docs.kernel.org/admin-guide/mm/ksm.html
"""

EXAMPLES = r"""
- name: Merge guest memory at a balanced pace and keep it after a reboot
  smallcloud.kvm.ksm:
    run: running
    preset: balanced
    persist: true

- name: Let KSM merge pages of different NUMA nodes (unmerges first)
  smallcloud.kvm.ksm:
    merge_across_nodes: true

- name: Stop KSM and give every merged page back to its owner
  smallcloud.kvm.ksm:
    run: unmerge
"""

RETURN = r"""
settings:
  description: The managed settings after the task (in check mode, as they are now).
  returned: success
  type: dict
  sample:
    run: running
    pages_to_scan: 1000
    sleep_millisecs: 20
    max_page_sharing: 256
    merge_across_nodes: true
    use_zero_pages: false
    smart_scan: true
stats:
  description: KSM's counters after the task (every read-only file of C(kernel/mm/ksm)).
  returned: success
  type: dict
  sample:
    pages_shared: 1200
    pages_sharing: 9800
    full_scans: 4
ksm:
  description: Everything M(smallcloud.kvm.ksm_info) returns, read after the task.
  returned: success
  type: dict
actions:
  description: The steps taken, or that would be taken in check mode, in order.
  returned: always
  type: list
  elements: str
  sample: ["set pages_to_scan to 1000", "set run to running"]
diff:
  description: Each managed setting (and the persisted file) before and after.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.ksm import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
