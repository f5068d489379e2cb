# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``ksm`` module: the wanted KSM settings planned against sysfs, then applied."""

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import SYSFS_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.files import read_text, write_text
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import ksm_sysfs as sysfs

# plugins/modules/ksm.py documents exactly these.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            run=dict(type="str", choices=list(sysfs.RUN_STATES)),
            preset=dict(type="str", choices=sorted(sysfs.PRESETS)),
            pages_to_scan=dict(type="int"),
            sleep_millisecs=dict(type="int"),
            max_page_sharing=dict(type="int"),
            merge_across_nodes=dict(type="bool"),
            use_zero_pages=dict(type="bool"),
            smart_scan=dict(type="bool"),
            persist=dict(type="bool", default=False),
            persist_path=dict(type="path", default=sysfs.DEFAULT_PERSIST_PATH),
        ),
        SYSFS_ARGS,
    ),
    supports_check_mode=True,
)


def converge(params, check_mode=False):
    """Observe, plan, apply (a preview in check mode); the ksm module's result."""
    sysfs_root = params.get("sysfs_root") or "/sys"
    desired = sysfs.desired_settings(params)
    directory = sysfs.ksm_dir(sysfs_root)
    raw = sysfs.read_all(sysfs_root)
    sysfs.check_present(directory, raw, desired)
    plan = sysfs.plan_settings(directory, sysfs.settings_view(raw), desired)
    if params.get("persist"):
        path = params.get("persist_path") or sysfs.DEFAULT_PERSIST_PATH
        content = sysfs.persist_content(directory, desired)
        if plan.compare("persist_file", read_text(path), content):
            plan.add("write %s" % path, write_text, path, content)
    plan.apply(check_mode)
    after = sysfs.info(sysfs_root)
    return plan.result(settings=sysfs.settings_view(sysfs.read_all(sysfs_root)), stats=after["counters"], ksm=after)


def run(module):
    """Entry point for run_module."""
    return converge(module.params, module.check_mode)
