# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``placement`` module: every declared instance gets a host, reserved in etcd.

Run once per converge (the cloud role runs it on one host); each instance's placement is one etcd transaction
(host.placement). Order: validate every entry, preview the whole batch (an instance that fits nowhere fails
here, before anything is reserved), then reserve the new ones in the same order (check mode stops at the
preview). Instances that exist already but were never placed (created by a pinned run, or before placement
existed) are adopted where they run, without a capacity check: a placed instance never moves.
"""

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.disks import parse_size
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.instance_spec import DEFAULTS, INSTANCE_OPTIONS
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, validated_options, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (
    DEFAULT_RATIOS,
    Placements,
    check_ratio,
    demand_of,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

# The keys of a cloud role instance entry the placement reads; the rest belong to the instance module.
PLACEMENT_KEYS = dict(host=dict(type="str"), affinity=dict(type="str"), anti_affinity=dict(type="str"))
ENTRY_SPEC = {"argument_spec": dict(INSTANCE_OPTIONS, **PLACEMENT_KEYS)}

# plugins/modules/placement.py documents exactly these.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            instances=dict(type="list", elements="dict", required=True),
            **{option: dict(type="raw", default=default) for option, default in DEFAULT_RATIOS.items()}
        ),
        ETCD_ARGS,
    ),
    supports_check_mode=True,
)


def run(module):
    """Entry point for run_module."""
    placements, wanted, existing = prepare(module.params)
    previewed = place_all(placements, wanted, existing, write=False)
    if module.check_mode or not any(item["new"] for item in previewed.values()):
        return result(previewed)
    placements.read()  # the preview's view counted its own guesses: start again from etcd
    return result(place_all(placements, wanted, existing, write=True))


def prepare(params):
    """``(Placements, validated entries, instance records)`` of the module's options: everything validated."""
    defaults = {option: check_ratio(option, params[option]) for option in DEFAULT_RATIOS}
    wanted = [entry_of(entry, index) for index, entry in enumerate(params["instances"])]
    check_unique(wanted)
    placements = Placements(Store.from_params(params), defaults)
    return placements, wanted, records.instances(placements.store)


def entry_of(entry, index):
    """One validated entry: ``{name, state, host, demand}``."""
    if not isinstance(entry, dict):
        raise InvalidInput("instances[%d] is not a dict: %r" % (index, entry), entry=entry)
    unknown = sorted(set(entry) - set(ENTRY_SPEC["argument_spec"]))
    if unknown:
        raise InvalidInput("instances[%d] has unknown keys %s; allowed: %s" % (
            index, ", ".join(unknown), ", ".join(sorted(ENTRY_SPEC["argument_spec"]))), keys=unknown)
    options = validated_options(ENTRY_SPEC, entry, "instances[%d] (%s)" % (index, entry.get("name")),
                                entry=entry.get("name"))
    name = check_name("instance", options.get("name"))
    for group in ("affinity", "anti_affinity"):
        if options.get(group) is not None:
            check_name("%s group" % group, options[group])
    if options.get("host") is not None:
        check_name("host", options["host"])
    disks = [options["disk_size"]] if options.get("disk_size") else []
    disks += list(options.get("ephemeral_disks") or [])
    cpus = options["cpus"] if options.get("cpus") is not None else DEFAULTS["cpus"]
    memory = options["memory"] if options.get("memory") is not None else DEFAULTS["memory"]
    for option, value, low in (("cpus", cpus, 1), ("memory", memory, 1)):
        if value < low:
            raise InvalidInput("instance %s: %s %r must be at least %d" % (name, option, value, low),
                               **{option: value})
    disk_bytes = sum(parse_size(size, "disk_size" if position == 0 and options.get("disk_size") else
                                "ephemeral_disks") for position, size in enumerate(disks))
    return {"name": name, "state": options.get("state") or "running", "host": options.get("host"),
            "demand": demand_of(cpus, memory, disk_bytes, options.get("anti_affinity"), options.get("affinity"))}


def check_unique(wanted):
    names = [item["name"] for item in wanted]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidInput("instance %s is listed more than once" % twice[0], name=twice[0])


def place_all(placements, wanted, existing, write):
    """``{name: {host, reason, new}}`` of the batch, in order; with ``write``, the new placements are reserved
    (one transaction per host), else previewed."""
    hostnames = {record.get("hostname"): name for name, record in placements.hosts().items()}
    placed, items = {}, []
    for item in wanted:
        name, demand = item["name"], item["demand"]
        running_on = host_of_record(existing.get(name), hostnames)
        where = placements.placement_of(name)
        if item["state"] == "absent":
            # Removal needs no capacity: where it is (its placement, else its record's host), or nowhere.
            placed[name] = {"host": where["host"] if where else running_on, "reason": "being removed", "new": False}
            continue
        check_pin(name, item["host"], where["host"] if where else running_on)
        if where is None and running_on is not None:
            # Created before it was placed (or by a pinned run of an older release): it stays where it runs.
            items.append((name, demand, running_on, "adopted where it already ran"))
        else:
            items.append((name, demand, item["host"], None))
        placed[name] = None  # keeps the declared order
    if write:
        chosen = placements.place_all(items)
    else:
        chosen = {name: placements.preview(name, demand, pinned, reason) for name, demand, pinned, reason in items}
    for name, (host, reason, new) in chosen.items():
        placed[name] = {"host": host, "reason": reason, "new": new}
    return placed


def check_pin(name, pinned, current):
    """Refuse a ``host`` other than the one the instance is on: a placed instance does not move by itself."""
    if current is not None and pinned not in (None, current):
        raise InvalidInput("instance %s: host %s is not where it is (%s); a placed instance does not move by itself "
                           "(evacuate %s to move its guests)" % (name, pinned, current, current),
                           instance=name, host=pinned, placed_on=current)


def host_of_record(record, hostnames):
    """The registry name of the host an instance record names (records name the machine's host name)."""
    if not isinstance(record, dict) or not record.get("host"):
        return None
    return hostnames.get(record["host"], record["host"])


def result(placed):
    return {"changed": any(item["new"] for item in placed.values()), "placements": placed,
            "actions": ["place instance %s on %s (%s)" % (name, item["host"], item["reason"])
                        for name, item in placed.items() if item["new"]]}


def instances_on_host(instances, placements, host, first_host):
    """The entries of ``instances`` (the cloud role's) placed on ``host``, without the role's keys: one instance
    call's batch. An instance to remove that is nowhere goes to ``first_host``, whose call finds nothing."""
    batch = []
    for entry in instances:
        where = (placements.get(entry.get("name")) or {}).get("host") or entry.get("host") or first_host
        if where == host:
            batch.append({key: value for key, value in entry.items() if key not in PLACEMENT_KEYS})
    return batch
