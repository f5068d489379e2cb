# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``instance`` module: validate every instance, observe, plan, apply.

The layers: ``instance_spec`` (options, validation), ``instance_observe`` (what the batch reads once),
``instance_planner`` (wanted + observed -> steps), ``instance_applier`` (the steps, with undo) and
``instance_model`` (the desired definition both of them use).

One call converges one instance (``name``) or many (``instances``), over one libvirt connection and
one etcd listing of ``instances/``. Per instance, on the host::

    <instances_dir>/NAME/root.qcow2          overlay on the cached image (grown to disk_size)
    <instances_dir>/NAME/ephemeral-N.qcow2   fresh empty disks
    <instances_dir>/NAME/seed.iso            cloud-init NoCloud seed (label cidata)
    <instances_dir>/NAME/console.log         serial console, written by virtlogd

and in etcd ``instances/NAME`` = {"name", "interfaces": [{"network", "mac", "ip"}], "host", "uuid", "state",
"image", "cpus", "memory", "disks", "bridges", "hostname", "seed", "console_log", ...}, with MAC and IP
allocations owned by ``instance/NAME``. Everything is validated before the first change; a failed
creation undoes what it did. A re-run with nothing to change runs no command and no etcd request beyond
the one listing.
"""


from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import reachability
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.connection import open_libvirt
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_observe import Observation
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_planner import InstancePlanner
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_spec import MODULE_SPEC, expand
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import ChangedMeanwhile
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import guest_filter
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

__all__ = ["MODULE_SPEC", "run"]


def run(module):
    """Entry point for run_module: every instance validated, observed and planned, then applied."""
    wanted = expand(module.params)
    store = Store.from_params(module.params)
    conn = open_libvirt(module.params["uri"])
    try:
        observation = Observation(module.params, store, conn)
        planners = [InstancePlanner(observation, want) for want in wanted]
        for planner in planners:
            planner.build()
        waits = module.params["wait_for"] == "ssh"
        # Read once for the batch, and only to wait: for the refusal before any change and the wait after it.
        networks = observation.networks() if waits else {}
        floating_ips = records.floating_ips(store) if waits else {}
        refuse_unreachable(module.params, wanted, networks, floating_ips)
        for warning in observation.warnings:
            module.warn(warning)
        # Every guest this batch stops is asked at once, after the whole batch validated, so their
        # shutdown waits overlap: N guests that ignore ACPI cost one shutdown_timeout, not N.
        for planner in planners:
            planner.shutdown.apply(module.check_mode)
        for index, planner in enumerate(planners):
            planners[index] = apply_or_replan(module.params, store, conn, planner, module.check_mode)
    finally:
        conn.close()
    host_plan = plan_guest_filter(observation, planners, module.check_mode)
    host_plan.apply(module.check_mode)
    waited = wait_for_guests(module.params, planners, networks, floating_ips, module.check_mode)
    return with_host_plan(batch_result(module.params, planners, waited), host_plan)


def plan_guest_filter(observation, planners, check_mode):
    """The plan of this host's security groups (network.guest_filter), from the records as the batch left them.

    Unchanged instances: the records the batch read. Changed ones: read again after the apply; in check mode
    the table is left to the real run, which rewrites it from the records it wrote.
    """
    host_plan = Plan()
    changed = any(planner.changed for planner in planners)
    if changed and check_mode:
        return host_plan
    instances = records.instances(observation.store) if changed else observation.records
    guest_filter.plan(host_plan, observation.host, instances, observation.security_groups, observation.networks)
    return host_plan


def with_host_plan(result, host_plan):
    """The batch result with the host's own steps (the guest filter) added."""
    if host_plan.changed:
        result["changed"] = True
        result["actions"] = [*result.get("actions", []), *("host: %s" % action for action in host_plan.actions)]
        diff = result.setdefault("diff", {"before": {}, "after": {}})
        diff["before"].update(host_plan.diff["before"])
        diff["after"].update(host_plan.diff["after"])
    return result


def refuse_unreachable(params, wanted, networks, floating_ips):
    """With ``wait_for: ssh``, InvalidInput for a running instance this host could not probe."""
    if params["wait_for"] != "ssh":
        return
    for want in wanted:
        if want["state"] == "running":
            reachability.check_reachable(want["name"], [network for network, _ip in want["networks"]], networks,
                                         floating_ips, params["namespace_prefix"])


def wait_for_guests(params, planners, networks, floating_ips, check_mode):
    """``{name: seconds until SSH answered}`` of the running guests, with ``wait_for: ssh`` (not in check mode)."""
    if params["wait_for"] != "ssh" or check_mode:
        return {}
    running = [planner for planner in planners if planner.want["state"] == "running"]
    routes = {planner.name: reachability.probe_route(planner.name, planner.applier.record, networks, floating_ips,
                                                     params["namespace_prefix"]) for planner in running}
    return reachability.wait_for_ssh(routes, params["wait_timeout"])


def apply_or_replan(params, store, conn, planner, check_mode):
    """Apply one instance's plan; the planner whose plan was applied.

    When another run created the instance between this run's look and its lock (several controllers converging
    the same cloud at once), its plan is stale: look again, as that run left it, and apply what is still to do
    (usually nothing), instead of failing a run whose work is done.
    """
    try:
        apply_one(planner, check_mode)
        return planner
    except ChangedMeanwhile:
        fresh = InstancePlanner(Observation(params, store, conn), planner.want)
        fresh.build()
        apply_one(fresh, check_mode)
        return fresh


def apply_one(planner, check_mode):
    """Apply one instance's plan, under its lock when it changes anything."""
    with Plan.held_while_applying(check_mode, planner.lock), planner.applier.errors():
        planner.plan.apply(check_mode)


def batch_result(params, planners, waited):
    """The task result: per-instance results, plus the single instance's keys at the top for ``name``."""
    results = [dict(planner.facts(), **({"ssh_after": waited[planner.name]} if planner.name in waited else {}))
               for planner in planners]
    if params.get("instances") is None:
        result = planners[0].plan.result(**results[0])
        result["instances"] = results
        return result
    changed = [planner for planner in planners if planner.plan.diff["before"] or planner.plan.diff["after"]]
    return {
        "changed": any(planner.changed for planner in planners),
        "diff": {"before": {p.name: p.plan.diff["before"] for p in changed},
                 "after": {p.name: p.plan.diff["after"] for p in changed}},
        "actions": ["%s: %s" % (p.name, action) for p in planners for action in p.actions],
        "instances": results,
    }
