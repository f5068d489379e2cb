# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one place where a typed error becomes a failed task."""

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import SmallcloudError


def run_module(module, converge):
    """Call ``converge(module)`` -> result dict and exit; a SmallcloudError fails the task."""
    try:
        result = converge(module)
    except SmallcloudError as error:
        module.fail_json(msg=error.msg, error=type(error).__name__, **error.details)
    module.exit_json(**result)
