# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``image`` module: one cache entry observed, planned (fetch, or remove) and applied,
a real run under the entry's lock so that concurrent runs for one URL download once."""

import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import IMAGE_CACHE_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_store as store
from ansible_collections.smallcloud.kvm.plugins.module_utils.image.cached import (
    IMAGE_OPTIONS,
    ImageRequest,
    describe,
    entry_held,
    facts_of,
    fetch_into,
    fetch_reason,
    touch,
    wanted,
)

# Matches the DOCUMENTATION of plugins/modules/image.py.
MODULE_SPEC = dict(
    argument_spec=with_common(IMAGE_OPTIONS, IMAGE_CACHE_ARGS),
    mutually_exclusive=[["url", "name"], ["checksum", "checksum_url"]],
    required_one_of=[["url", "name"]],
    supports_check_mode=True,
)


def run(module):
    """Entry point of the image module: observe, plan, apply (a real run under the entry lock) -> result."""
    params = module.params
    request = ImageRequest(params)
    entry = store.Entry(params["cache_dir"], store.entry_key(request.url), request.format)
    if params["state"] == "present":
        store.check_writable(params["cache_dir"])
    elif not os.path.isdir(params["cache_dir"]):
        plan, facts = plan_absent(request, entry)  # nothing cached, nothing to lock
        return plan.result(**facts())
    with Plan.held_while_applying(module.check_mode, lambda: entry_held(entry)):
        plan, facts = (plan_present if params["state"] == "present" else plan_absent)(request, entry)
        for warning in request.warnings:
            module.warn(warning)
        plan.apply(module.check_mode)
    return plan.result(**facts())


def plan_present(request, entry):
    """``(plan, facts)``: fetch the entry when it is missing or stale, else only note its use."""
    meta = entry.current()
    reason = fetch_reason(request, meta)
    plan = Plan()
    plan.compare("image", describe(entry, meta), wanted(entry, request, meta, reason))
    fetched = {}
    if reason:
        plan.add("fetch %s into %s (%s)" % (request.url, entry.path, reason), fetch_into, request, entry, fetched)
    elif meta is not None:
        plan.after_apply(touch, entry, meta)

    def facts():
        if fetched:
            plan.compare("image", describe(entry, meta), describe(entry, fetched["meta"]))
        return facts_of(entry, request, fetched.get("meta", meta), fetched.get("downloaded", 0), reason)

    return plan, facts


def plan_absent(request, entry):
    """``(plan, facts)``: remove the entry when it is there."""
    plan = Plan()
    meta = entry.read_metadata()
    present = entry.exists()
    before = describe(entry, meta) if meta else {"state": "present" if present else "absent", "path": entry.path}
    plan.compare("image", before, {"state": "absent", "path": entry.path})
    if present:
        plan.add("remove %s (%s)" % (entry.path, request.url), entry.remove)
    facts = dict(path=entry.path, url=request.url, key=entry.key, format=request.format, downloaded=0)
    return plan, lambda: facts
