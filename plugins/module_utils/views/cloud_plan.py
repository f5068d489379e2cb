# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``cloud_plan`` module's logic: what converging this host would change, in one module call.

Each entry is validated against its own module's argument spec (``core.args.validated_options``: defaults,
types, choices, required_if, mutually_exclusive) and run through that module's own runner in check mode,
in this one process: one Python start-up, one set of imports, instead of one module call per image,
network and instance batch.
Nothing is changed. A re-converge with nothing to do (the common case) asks only this and skips the rest
(the cloud role does).
"""

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import instances as instance_runner
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, validated_options, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import SmallcloudError
from ansible_collections.smallcloud.kvm.plugins.module_utils.host import hosts, placing
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import images as image_runner
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import floating_ips as floating_ip_runner
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import networks as network_runner
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import security_groups as security_group_runner
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import store

# kind -> (runner module, what names an entry in the result)
KINDS = {
    "security_groups": (security_group_runner, lambda params: params["name"]),
    "images": (image_runner, lambda params: params.get("name") or params.get("url")),
    "networks": (network_runner, lambda params: params["name"]),
    "instances": (instance_runner, lambda params: "this host's instances"),
    "floating_ips": (floating_ip_runner, lambda params: "%s/%s" % (
        params["network"], params.get("instance") or params.get("fixed_ip") or params.get("address"))),
}

MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            security_groups=dict(type="list", elements="dict", default=[]),
            images=dict(type="list", elements="dict", default=[]),
            networks=dict(type="list", elements="dict", default=[]),
            instances=dict(type="dict"),
            floating_ips=dict(type="list", elements="dict", default=[]),
            placement=dict(type="dict", options=dict(
                instances=dict(type="list", elements="dict", required=True),
                host=dict(type="str", required=True),
                hosts=dict(type="list", elements="str", required=True),
                first_host=dict(type="str", required=True),
                **{option: dict(type="raw", default=default) for option, default in placing.DEFAULT_RATIOS.items()}
            )),
        ),
        ETCD_ARGS,
    ),
    supports_check_mode=True,
)


class CheckModule:
    """What a runner uses of AnsibleModule: validated params, check mode, warnings."""

    check_mode = True

    def __init__(self, params):
        self.params = params
        self.warnings = []

    def warn(self, warning):
        self.warnings.append(warning)


def entries(params):
    """``(kind, index, options)`` of every module call the plan stands for, the etcd options shared."""
    shared = {key: params[key] for key in ETCD_ARGS if params.get(key) is not None}
    batch = params["instances"] or {}
    # An instance call for a host without instances (the role's empty batch) would change nothing.
    batches = [batch] if batch.get("instances") or batch.get("name") else []
    for kind in ("security_groups", "images", "networks", "instances", "floating_ips"):
        listed = (params.get(kind) or []) if kind != "instances" else batches
        for index, entry in enumerate(listed):
            options = dict(entry)
            if kind != "images":  # the image cache is no etcd client
                options = dict(shared, **options)
            yield kind, index, options


def run(module):
    """Entry point for run_module: the entries in check mode, in the role's order, up to the first that
    would change something (``would_change``). It stops there: a later entry's check may depend on that
    change (an instance on a network this run would create), and one change is enough to converge."""
    with store.shared_gateways():
        return plan(module)


def plan(module):
    """What run() returns, the Stores of every runner sharing their etcd connection."""
    placements, changes = preview_placement(module.params)
    if changes:
        return {"changed": False, "would_change": True, "changes": changes, "placements": placements}
    warnings = []
    for kind, index, options in entries(module.params):
        runner, label = KINDS[kind]
        checked = CheckModule(validated_options(runner.MODULE_SPEC, options, "%s[%d]" % (kind, index), kind=kind,
                                                index=index))
        result = run_entry(runner, checked, "%s[%d]" % (kind, index))
        warnings += checked.warnings
        if result.get("changed"):
            changes.append({"kind": kind, "name": label(checked.params), "actions": result.get("actions", [])})
            break
    for warning in warnings:
        module.warn(warning)
    return {"changed": False, "would_change": bool(changes), "changes": changes, "placements": placements}


def run_entry(runner, checked, label):
    """One entry's check; its refusal names the entry (``networks[0]: ...``), as the entry's options do."""
    try:
        return runner.run(checked)
    except SmallcloudError as error:
        raise type(error)("%s: %s" % (label, error.msg), **error.details) from error


def preview_placement(params):
    """``(placements, changes)`` of the whole declared cloud (``placement``), and this host's instance batch put
    into ``params["instances"]``: a host not registered yet, or an instance not placed yet, is a change."""
    wanted = params.get("placement")
    if wanted is None:
        return {}, []
    ratios = {key: wanted[key] for key in placing.DEFAULT_RATIOS}
    view, declared, existing = placing.prepare(dict(params, instances=wanted["instances"], **ratios))
    # Placement chooses among registered hosts: the converge registers the play's hosts first.
    unregistered = sorted(set(wanted["hosts"]) - set(view.hosts()))
    if unregistered:
        return {}, [{"kind": "hosts", "name": ", ".join(unregistered),
                     "actions": ["register host %s" % host for host in unregistered]}]
    # The converge refreshes this host's record: its capacity, as placement reads it, must be today's.
    instances_dir = (params["instances"] or {}).get("instances_dir") or hosts.DEFAULT_INSTANCES_DIR
    recorded = view.hosts()[wanted["host"]].get("capacity")
    if recorded != hosts.capacity(instances_dir):
        return {}, [{"kind": "hosts", "name": wanted["host"], "actions": [
            "refresh the capacity of host %s (recorded: %s)" % (wanted["host"], recorded)]}]
    placed = placing.place_all(view, declared, existing, write=False)
    batch = placing.instances_on_host(wanted["instances"], placed, wanted["host"], wanted["first_host"])
    params["instances"] = dict(params["instances"] or {}, instances=batch)
    new = ["place instance %s on %s (%s)" % (name, item["host"], item["reason"])
           for name, item in placed.items() if item["new"]]
    return placed, [{"kind": "placement", "name": "the declared instances", "actions": new}] if new else []
