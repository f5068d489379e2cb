# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``ksm_info`` module: KSM's settings, counters and savings; never changes anything."""

import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import SYSFS_ARGS
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import ksm_sysfs as sysfs

MODULE_SPEC = dict(argument_spec=dict(SYSFS_ARGS), supports_check_mode=True)


def run(module):
    """Entry point for run_module: a kernel without KSM is a fact to report, not a failure."""
    sysfs_root = module.params["sysfs_root"]
    try:
        facts = sysfs.info(sysfs_root)
    except HostError as error:
        if not os.path.isdir(os.path.join(sysfs_root, sysfs.KSM_SUBDIR)):
            return {"changed": False, "ksm": {"available": False, "reason": error.msg}}
        raise
    return {"changed": False, "ksm": facts}
