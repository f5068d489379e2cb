# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner of the ``instance_move`` module: the steps that move one instance to another hypervisor.

The evacuate playbook runs them in this order, each on the host named::

    list     (any host)    the instances on the host being drained, moves in progress included
    reserve  (any host)    the target, chosen by placement and reserved there; the record says ``moving_to``
    export   (source)      the guest shut down (ACPI, then forced after shutdown_timeout); its XML and files
    import   (target)      the copied files in place, the overlay rebased onto the target's cached image, the
                           domain defined with the same UUID, MACs and disks, and started
    commit   (target)      one etcd txn: the record's host, the placement, the source's ledger
    cleanup  (source)      domains and directories of instances whose record moved elsewhere

Every step looks before it acts and does only what is left, so an evacuation killed at any point is completed
by running it again: the record moves last (commit), and until then the source's copy is the one that counts;
an instance whose record says ``moving_to`` is refused by the instance module, so no converge starts the
source's copy while the target's may run.
"""

import contextlib
import os
import shutil
import socket
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import disks as disk_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.connection import (
    host_errors,
    libvirt,
    open_libvirt,
    undefine_flags,
    wait_stopped,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.domain import observe
from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS, LIBVIRT_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.hosts import instances_on
from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placement import (
    Placements,
    demand_of,
    ledger_key,
    placement_key,
    reservation,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import guest_filter
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

STEPS = ("list", "reserve", "export", "import", "commit", "cleanup")
INCOMING = ".incoming-%s"  # where the copied files of an instance wait on the target, inside instances_dir

# plugins/modules/instance_move.py documents exactly these.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            step=dict(type="str", required=True, choices=list(STEPS)),
            name=dict(type="str"),
            from_host=dict(type="str"),
            xml=dict(type="str"),
            source_dir=dict(type="path"),
            cache_dir=dict(type="path", default="/var/lib/smallcloud/images"),
            image_checksum=dict(type="str"),
            instances_dir=dict(type="path", default="/var/lib/smallcloud/instances"),
            shutdown_timeout=dict(type="int", default=60),
        ),
        ETCD_ARGS,
        LIBVIRT_ARGS,
    ),
    required_if=[
        ["step", "list", ["from_host"]],
        ["step", "reserve", ["name", "from_host"]],
        ["step", "export", ["name"]],
        ["step", "import", ["name", "xml", "source_dir"]],
        ["step", "commit", ["name"]],
    ],
    supports_check_mode=True,
)


def run(module):
    """Entry point for run_module: one step."""
    params = module.params
    if params.get("name") is not None:
        check_name("instance", params["name"])
    if params.get("from_host") is not None:
        check_name("host", params["from_host"])
    if params["shutdown_timeout"] < 0:
        raise InvalidInput("shutdown_timeout %r must be >= 0 seconds" % params["shutdown_timeout"],
                           shutdown_timeout=params["shutdown_timeout"])
    store = Store.from_params(params)
    step = params["step"]
    # The instance's own lock (the instance module's), so that neither a converge nor what is left of a killed
    # run's step works on it at the same time. A short TTL: a killed holder's lock frees itself soon.
    locked = step in ("reserve", "export", "import", "commit") and not module.check_mode
    hold = store.lock("instance/%s" % params["name"], ttl=10, timeout=120) if locked else contextlib.nullcontext()
    with hold:
        if step in ("list", "reserve", "commit"):
            return STEP_RUNNERS[step](params, store, module.check_mode)
        conn = open_libvirt(params["uri"])
        try:
            return STEP_RUNNERS[step](params, store, conn, module.check_mode)
        finally:
            conn.close()


def host_names(store, host):
    """``(registry record, {names an instance record may give this host})``; InvalidInput for an unknown host."""
    hosts = records.hosts(store)
    if host not in hosts:
        raise InvalidInput("host %s is not a registered hypervisor; registered: %s"
                           % (host, ", ".join(sorted(hosts)) or "none"), host=host)
    return hosts[host], {host, hosts[host].get("hostname")} - {None}


# list and reserve (etcd only) ------------------------------------------------------------------------


def step_list(params, store, _check_mode):
    """The instances on ``from_host``: by record, by placement, and those moving away from it."""
    host = params["from_host"]
    record, _names = host_names(store, host)
    placements = Placements(store)
    on_host = set(instances_on(store, host, record.get("hostname")))
    on_host |= {name for name, (placed, _rev) in placements.current()["placements"].items()
                if placed.get("host") == host or placed.get("moving_from") == host}
    return {"changed": False, "instances": sorted(on_host), "host": record}


def step_reserve(params, store, check_mode):
    """The target of instance ``name``: the one a killed run reserved, else placement's choice, reserved in one
    txn with the record's ``moving_to``. ``moved`` when the record is no longer on ``from_host``."""
    name, source = params["name"], params["from_host"]
    source_record, names = host_names(store, source)
    path = records.instance_key(name)
    instance, instance_rev = store.get_with_revision(path)
    if not isinstance(instance, dict):
        raise InvalidInput("instance %s has no record; nothing to move (recorded: %s)"
                           % (name, ", ".join(sorted(records.instances(store))) or "none"), name=name)
    placements = Placements(store)
    placed = placements.placement_of(name)
    result = {"changed": False, "name": name, "uuid": instance.get("uuid"), "image": instance.get("image"),
              "moved": False}
    if instance.get("host") not in names and not instance.get("moving_to"):
        return dict(result, moved=True, target=(placed or {}).get("host") or instance.get("host"))
    if instance.get("moving_to"):
        return dict(result, target=instance["moving_to"])
    if source_record.get("state", "active") == "active":
        raise InvalidInput("host %s is active; drain it first (smallcloud.kvm.host status=draining), so that "
                           "nothing is placed there while its instances move" % source, host=source)
    disks = (instance.get("disk_size") or 0) + sum(instance.get("ephemeral_disks") or [])
    if placed:
        demand = reservation(placed)
    else:
        demand = demand_of(instance.get("cpus") or 1, instance.get("memory") or 512, disks)
    target, reason = placements.choose(name, demand, None, None)  # the source is not active: never chosen
    result.update(changed=True, target=target, reason=reason)
    if check_mode:
        return result
    view = placements.current()
    ledger, ledger_rev = view["ledgers"].get(target, ({"instances": {}}, 0))
    placed_rev = view["placements"].get(name, (None, 0))[1]
    moving = dict(placed or dict(demand, host=source), moving_to=target, moving_from=source)
    written, _answer = store.transact(
        expect={path: instance_rev, placement_key(name): placed_rev, ledger_key(target): ledger_rev,
                records.host_key(target): view["hosts"][target][1]},
        put={path: dict(instance, moving_to=target), placement_key(name): moving,
             ledger_key(target): {"instances": dict(ledger.get("instances") or {}, **{name: reservation(demand)})}})
    if not written:
        raise Conflict("instance %s changed while its move was reserved; run the evacuation again" % name, name=name)
    store.log_event("instance", name, "moving from %s to %s (%s)" % (source, target, reason))
    return result


# export (on the source) ------------------------------------------------------------------------------


def step_export(params, store, conn, check_mode):
    """Shut the guest down here (gracefully first) and describe it: its inactive XML and its files."""
    name = params["name"]
    instance = store.get(records.instance_key(name)) or {}
    here = socket.gethostname()
    if instance.get("host") != here:
        return {"changed": False, "moved": True, "files": [], "xml": None}
    if not instance.get("moving_to"):
        raise InvalidInput("instance %s is not being moved; reserve its move first" % name, name=name)
    domain = lookup(conn, name)
    if domain is None:
        raise HostError("instance %s is recorded on %s but has no domain here; nothing to export" % (name, here),
                        name=name)
    check_uuid(domain, instance, name)
    running = bool(domain.isActive())
    directory = os.path.join(params["instances_dir"], name)
    result = {"changed": running, "moved": False, "source_dir": directory,
              "image_checksum": image_digest(instance, params["cache_dir"]),
              "files": sorted(os.path.join(directory, entry) for entry in os.listdir(directory)
                              if os.path.isfile(os.path.join(directory, entry))),
              "xml": domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)}
    if check_mode or not running:
        return result
    with host_errors(name):
        domain.setAutostart(0)  # the target's copy autostarts from now on, never this one
        try:
            domain.shutdown()
        except libvirt.libvirtError:
            pass  # no ACPI: forced off below
        wait_stopped(domain, time.time() + params["shutdown_timeout"])
    store.log_event("instance", name, "stopped on %s to move to %s" % (here, instance["moving_to"]))
    return result


# import (on the target) ------------------------------------------------------------------------------


def step_import(params, store, conn, check_mode):
    """Put the copied files in place, rebase the overlay onto this host's image, define and start the guest."""
    name = params["name"]
    instance = store.get(records.instance_key(name)) or {}
    directory = os.path.join(params["instances_dir"], name)
    incoming = os.path.join(params["instances_dir"], INCOMING % name)
    domain = lookup(conn, name)
    actions = []
    if domain is None:
        if not os.path.isdir(incoming) and not os.path.isdir(directory):
            raise HostError("instance %s: its files were not copied to %s" % (name, incoming), name=name)
        actions = ["move %s to %s" % (incoming, directory)] if os.path.isdir(incoming) else []
        actions += ["define domain %s (uuid %s)" % (name, instance.get("uuid"))]
    else:
        check_uuid(domain, instance, name)
        if os.path.isdir(incoming):
            actions.append("remove %s (already imported)" % incoming)
    if domain is None or not domain.isActive():
        actions.append("start %s" % name)
    if check_mode or not actions:
        return {"changed": bool(actions), "actions": actions}
    with host_errors(name):
        if domain is None:
            place_files(directory, incoming, cached_image(instance, params))
            domain = conn.defineXML(params["xml"].replace(params["source_dir"].rstrip("/") + "/", directory + "/"))
            domain.setAutostart(1 if instance.get("autostart") else 0)
        elif os.path.isdir(incoming):
            shutil.rmtree(incoming)
        if not domain.isActive():
            # Its security groups hold here before it runs here (the record names this host as moving_to).
            guest_filter.converge_now(socket.gethostname(), store)
            domain.create()
    store.log_event("instance", name, "started on %s" % socket.gethostname())
    return {"changed": True, "actions": actions}


def image_digest(instance, cache_dir):
    """The digest this host's cache verified the instance's image with (``sha256:...``), or ``skip`` when it
    was accepted unverified: what the target checks its own copy against."""
    from ansible_collections.smallcloud.kvm.plugins.module_utils.image import cached  # noqa: PLC0415

    _request, entry = cached.request_for(instance.get("image") or "", "skip", cache_dir)
    return (entry.current() or {}).get("digest") or "skip"


def cached_image(instance, params):
    """``{path, format}`` of the instance's image in this host's cache, fetched first when missing (as the instance
    module fetches it for a new instance), checked against the digest the source's cache had."""
    # Imported here: only an import needs the image cache and its fetch code.
    from ansible_collections.smallcloud.kvm.plugins.module_utils.image import cached  # noqa: PLC0415

    if not instance.get("image"):
        raise InvalidInput("instance %s: its record names no image to rebase its disk onto" % params["name"],
                           name=params["name"])
    request, entry = cached.request_for(instance["image"], params["image_checksum"] or "skip", params["cache_dir"])
    plan, facts = cached.plan_cached(request, entry)
    plan.apply(False)
    return facts()


def place_files(directory, incoming, image):
    """The copied files become the instance's directory; its root overlay is rebased onto this host's image."""
    if os.path.isdir(incoming):
        # A fresh copy of the stopped source wins over what an earlier, killed import left.
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.rename(incoming, directory)
    root = os.path.join(directory, "root.qcow2")
    if os.path.exists(root) and (disk_ops.qcow2_header(root) or {}).get("backing_file") != image["path"]:
        commands.run(["qemu-img", "rebase", "-u", "-F", image["format"], "-b", image["path"], root])


# commit (on the target) and cleanup (on the source) ---------------------------------------------------


def step_commit(params, store, check_mode):
    """Move the record, the placement and the source's reservation to this host, in one txn."""
    name, here = params["name"], socket.gethostname()
    path = records.instance_key(name)
    instance, instance_rev = store.get_with_revision(path)
    if not isinstance(instance, dict):
        raise InvalidInput("instance %s has no record" % name, name=name)
    if not instance.get("moving_to"):
        return {"changed": False, "host": instance.get("host")}
    placed, placed_rev = store.get_with_revision(placement_key(name))
    source = (placed or {}).get("moving_from")
    ledger, ledger_rev = store.get_with_revision(ledger_key(source)) if source else (None, 0)
    if check_mode:
        return {"changed": True, "host": here}
    remaining = {other: entry for other, entry in ((ledger or {}).get("instances") or {}).items() if other != name}
    moved = {key: value for key, value in instance.items() if key != "moving_to"}
    moved["host"] = here
    put = {path: moved}
    expect = {path: instance_rev, placement_key(name): placed_rev}
    delete = []
    if placed is not None:
        put[placement_key(name)] = dict({key: value for key, value in placed.items()
                                         if key not in ("moving_to", "moving_from")},
                                        host=placed["moving_to"], reason="moved from %s" % source)
    if source:
        expect[ledger_key(source)] = ledger_rev
        if remaining:
            put[ledger_key(source)] = {"instances": remaining}
        else:
            delete.append(ledger_key(source))
    written, _answer = store.transact(expect=expect, put=put, delete=delete)
    if not written:
        raise Conflict("instance %s changed while its move was committed; run the evacuation again" % name, name=name)
    store.log_event("instance", name, "moved to %s" % here)
    return {"changed": True, "host": here}


def step_cleanup(params, store, conn, check_mode):
    """Remove this host's copies of instances whose record moved to another host (same UUID only)."""
    here = socket.gethostname()
    listing = records.instances(store)
    removed = []
    for domain in conn.listAllDomains(0):
        instance = listing.get(domain.name())
        definition = observe(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if (isinstance(instance, dict) and definition["managed"] and instance.get("host") != here
                and not instance.get("moving_to") and definition["uuid"] == instance.get("uuid")):
            removed.append(domain.name())
            if not check_mode:
                with host_errors(domain.name()):
                    if domain.isActive():
                        domain.destroy()
                    domain.undefineFlags(undefine_flags())
    for name, instance in listing.items():
        directory = os.path.join(params["instances_dir"], name)
        stale = isinstance(instance, dict) and instance.get("host") not in (here, None) and not instance.get(
            "moving_to") and os.path.isdir(directory) and name not in removed and lookup(conn, name) is None
        if (name in removed or stale) and os.path.isdir(directory):
            if not check_mode:
                shutil.rmtree(directory)
            removed.append(name)
    if removed and not check_mode:
        guest_filter.converge_now(socket.gethostname(), store)
    return {"changed": bool(removed), "removed": sorted(set(removed))}


def lookup(conn, name):
    """The domain named ``name``, or None."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def check_uuid(domain, instance, name):
    """Refuse a domain of that name that is not this instance (another UUID)."""
    if instance.get("uuid") and domain.UUIDString() != instance["uuid"]:
        raise Conflict("a domain named %s with UUID %s is not instance %s (UUID %s); not touched"
                       % (name, domain.UUIDString(), name, instance["uuid"]), name=name)


STEP_RUNNERS = {"list": step_list, "reserve": step_reserve, "export": step_export, "import": step_import,
                "commit": step_commit, "cleanup": step_cleanup}
