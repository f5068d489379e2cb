# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Placement: which hypervisor an instance runs on, and the capacity it reserves there.

etcd (under the store prefix)::

    hosts/HOST                    the host's record (host.hosts): its capacity, ratios and state
    placement/hosts/HOST          the host's ledger: {"instances": {NAME: RESERVATION}}
    placement/instances/NAME      where NAME is: RESERVATION + {"host", "reason", "time"}

A RESERVATION is ``{"vcpus", "memory_mb", "disk_gb", "affinity", "anti_affinity"}``. Placing one instance is
one transaction: it creates ``placement/instances/NAME`` only if absent, and rewrites the ledger of the chosen
host only if the ledger and the host's record are still at the revisions the choice was made from. Two
controllers placing at once therefore never overbook a host: the second one's transaction fails, and it chooses
again from what is now there. A placed instance stays where it is (the choice is never made again), and
releasing is the same kind of transaction the other way round.

The choice itself (``choose``) is pure: the hosts whose state is ``active`` and whose free capacity (capacity
times allocation ratio, minus what is reserved) holds the demand; none holding a member of the instance's
``anti_affinity`` group (hard); those holding a member of its ``affinity`` group first (soft); then the most
free memory, so guests spread. A pinned instance (``host``) goes to its host when that host is active, whatever
its free capacity (the operator decided; the reservation is still counted).
"""

import hashlib
import math
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, InvalidInput, StoreError
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import path_join, utc_iso

ACTIVE, DRAINING, DRAINED = "active", "draining", "drained"
HOST_STATES = (ACTIVE, DRAINING, DRAINED)
RESOURCES = ("vcpus", "memory_mb", "disk_gb")
# What the ratios are called in options and records, per resource.
RATIO_NAMES = {"vcpus": "cpu_allocation_ratio", "memory_mb": "memory_allocation_ratio",
               "disk_gb": "disk_allocation_ratio"}
# Cloud-wide defaults: CPUs are shared by time, memory is not (a guest's RAM is really used), disk is thin.
DEFAULT_RATIOS = {"cpu_allocation_ratio": 4.0, "memory_allocation_ratio": 1.0, "disk_allocation_ratio": 1.0}
# Hosts whose free memory is within this fraction of the best host's count as equally good (see spread).
SPREAD_WINDOW = 0.1
ATTEMPTS = 64  # transactions lost to other controllers before giving up on one instance
TXN_INSTANCES = 50  # placements per transaction: etcd allows 128 operations in one (--max-txn-ops)


class NoCapacity(StoreError):
    """No active host can take an instance (capacity, anti-affinity or state)."""


def ledger_key(host):
    return path_join("placement", "hosts", host)


def placement_key(name):
    return path_join("placement", "instances", name)


def check_ratio(option, value):
    """``value`` as a float >= 1; InvalidInput naming the option otherwise."""
    allowed = "a number >= 1 (1 means no overcommit)"
    if isinstance(value, bool):
        raise InvalidInput("%s %r is not valid; expected %s" % (option, value, allowed), **{option: value})
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise InvalidInput("%s %r is not a number; expected %s" % (option, value, allowed), **{option: value}) from None
    if not math.isfinite(ratio) or ratio < 1:
        raise InvalidInput("%s %r is below 1; expected %s" % (option, value, allowed), **{option: value})
    return ratio


def demand_of(cpus, memory, disk_bytes, anti_affinity=None, affinity=None):
    """A reservation: ``cpus`` vCPUs, ``memory`` MiB, disks in GiB (rounded up), the groups."""
    return {"vcpus": int(cpus), "memory_mb": int(memory), "disk_gb": int(math.ceil((disk_bytes or 0) / 2.0 ** 30)),
            "anti_affinity": anti_affinity or None, "affinity": affinity or None}


def describe(amounts):
    """``2 vCPUs, 1024 MiB, 10 GiB`` of a demand or a free-capacity dict."""
    return "%s vCPUs, %s MiB memory, %s GiB disk" % tuple(_number(amounts.get(key, 0)) for key in RESOURCES)


def _number(value):
    return int(value) if float(value).is_integer() else round(value, 1)


# the choice (pure) ----------------------------------------------------------------------------


def free_capacity(host, ledger, defaults=None):
    """``{resource: free}`` of a host record and its ledger: capacity x ratio - reserved (may go negative)."""
    capacity = host.get("capacity") or {}
    ratios = dict(DEFAULT_RATIOS, **(defaults or {}))
    ratios.update({key: value for key, value in (host.get("allocation_ratios") or {}).items() if value is not None})
    reserved = reserved_of(ledger)
    return {resource: capacity.get(resource, 0) * ratios[RATIO_NAMES[resource]] - reserved[resource]
            for resource in RESOURCES}


def reserved_of(ledger):
    """``{resource: total}`` reserved in a ledger."""
    entries = ((ledger or {}).get("instances") or {}).values()
    return {resource: sum(entry.get(resource, 0) for entry in entries) for resource in RESOURCES}


def groups_on(ledger, kind):
    """The ``kind`` (affinity / anti_affinity) groups with a member in a ledger."""
    return {entry.get(kind) for entry in ((ledger or {}).get("instances") or {}).values()} - {None}


def choose(name, demand, hosts, ledgers, *, pinned=None, defaults=None):
    """``(host, reason)`` for instance ``name`` with ``demand``; NoCapacity or InvalidInput naming why not.

    ``hosts`` and ``ledgers`` are ``{host: record}`` listings. Pure: nothing is read or written.
    """
    if pinned is not None:
        return choose_pinned(name, pinned, hosts)
    active = {host: record for host, record in hosts.items() if record.get("state", ACTIVE) == ACTIVE}
    if not active:
        raise NoCapacity("instance %s cannot be placed: no active host (registered: %s)"
                         % (name, describe_hosts(hosts)), instance=name)
    group = demand.get("anti_affinity")
    allowed = {host: record for host, record in active.items()
               if group is None or group not in groups_on(ledgers.get(host), "anti_affinity")}
    if not allowed:
        raise NoCapacity("instance %s cannot be placed: anti_affinity group %s already has a member on every active "
                         "host (%s)" % (name, group, ", ".join(sorted(active))), instance=name, anti_affinity=group)
    free = {host: free_capacity(record, ledgers.get(host), defaults) for host, record in allowed.items()}
    fitting = [host for host in allowed if all(free[host][key] >= demand[key] for key in RESOURCES)]
    if not fitting:
        best = max(free, key=lambda host: (free[host]["memory_mb"], host))
        raise NoCapacity("instance %s cannot be placed: it asks for %s; the best host, %s, has %s free"
                         % (name, describe(demand), best, describe(free[best])),
                         instance=name, demand=demand, best_host=best, free=free[best])
    together = demand.get("affinity")
    near = [host for host in fitting if together is not None and together in groups_on(ledgers.get(host), "affinity")]
    pool = near or fitting
    host = spread(name, {candidate: free[candidate]["memory_mb"] - demand["memory_mb"] for candidate in pool})
    reason = "most free memory (%s MiB after it) of %d fitting active hosts" % (
        _number(free[host]["memory_mb"] - demand["memory_mb"]), len(pool))
    if near:
        reason = "affinity group %s is there; %s" % (together, reason)
    elif together is not None:
        reason = "no fitting host has a member of affinity group %s yet; %s" % (together, reason)
    return host, reason


def spread(name, left):
    """The host with the most memory ``left`` after the instance, or one within SPREAD_WINDOW of it, picked by the
    instance's name: the same answer for every controller and preview of this instance, but controllers placing
    different instances at once do not all take (and fight over) the one best host."""
    best = max(left.values())
    close = sorted(host for host, memory in left.items() if memory >= best * (1 - SPREAD_WINDOW))
    return close[int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % len(close)]


def choose_pinned(name, pinned, hosts):
    """The pinned host when it is registered and active; InvalidInput naming it otherwise."""
    record = hosts.get(pinned)
    if record is None:
        raise InvalidInput("instance %s: host %s is not a registered hypervisor; registered: %s"
                           % (name, pinned, describe_hosts(hosts)), instance=name, host=pinned)
    state = record.get("state", ACTIVE)
    if state != ACTIVE:
        raise NoCapacity("instance %s: host %s is %s and takes no new instance; active hosts: %s"
                         % (name, pinned, state, ", ".join(sorted(
                             host for host, other in hosts.items() if other.get("state", ACTIVE) == ACTIVE))
                            or "none"), instance=name, host=pinned, state=state)
    return pinned, "pinned by its host key"


def describe_hosts(hosts):
    return ", ".join("%s (%s)" % (host, record.get("state", ACTIVE)) for host, record in sorted(hosts.items())) \
        or "none"


# the ledger in etcd ---------------------------------------------------------------------------


class Placements:
    """Placement through one Store: a view of hosts and ledgers, read once and again only after a lost race."""

    def __init__(self, store, defaults=None):
        self.store = store
        self.defaults = defaults or {}
        self.view = None
        self.fresh = False  # whether the view is as read, untouched by lost races

    def read(self):
        """Hosts, ledgers and placements with their revisions, in one round trip."""
        listings = self.store.list_with_revisions(records.HOSTS, "placement/hosts", "placement/instances")
        self.view = dict(zip(("hosts", "ledgers", "placements"), listings))
        self.fresh = True
        return self.view

    def current(self):
        return self.view if self.view is not None else self.read()

    def hosts(self):
        return {name: value for name, (value, _rev) in self.current()["hosts"].items() if isinstance(value, dict)}

    def ledgers(self):
        return {name: value for name, (value, _rev) in self.current()["ledgers"].items()}

    def placement_of(self, name):
        """The placement record of instance ``name``, or None."""
        found = self.current()["placements"].get(name)
        return found[0] if found else None

    def preview(self, name, demand, pinned=None, reason=None):
        """``(host, reason, new)`` as ``place_all`` would answer for this one, without writing; the view counts it
        for the next preview."""
        placed = self.placement_of(name)
        if placed is not None:
            return placed["host"], placed.get("reason"), False
        host, why = self.choose(name, demand, pinned, reason)
        view = self.current()
        view["placements"][name] = (dict(demand, host=host, reason=why), 0)
        ledger, revision = view["ledgers"].get(host, ({"instances": {}}, 0))
        view["ledgers"][host] = ({"instances": dict(ledger.get("instances") or {}, **{name: reservation(demand)})},
                                 revision)
        return host, why, True

    def choose(self, name, demand, pinned, reason, guesses=None):
        """``(host, reason)``: the choice from this view and this round's ``guesses`` (``{host: [(name, record)]}``,
        not written yet); ``pinned`` as is when a ``reason`` is given."""
        if reason is not None:
            return pinned, reason
        ledgers = self.ledgers()
        for host, entries in (guesses or {}).items():
            ledger = ledgers.get(host) or {}
            ledgers[host] = {"instances": dict(ledger.get("instances") or {},
                                               **{other: reservation(record) for other, record in entries})}
        return choose(name, demand, self.hosts(), ledgers, pinned=pinned, defaults=self.defaults)

    def place(self, name, demand, pinned=None, reason=None):
        """``(host, reason, new)`` of one instance, as ``place_all`` places it."""
        return self.place_all([(name, demand, pinned, reason)])[name]

    def place_all(self, items):
        """``{name: (host, reason, new)}`` of ``items``, ``(name, demand, pinned, reason)`` each, in order: the
        placed ones as they are, the others chosen (``pinned`` with a ``reason`` is taken as is: adoption) and
        reserved with one transaction per host (up to TXN_INSTANCES each), however many go there.

        A transaction lost to another controller re-reads what it compared; only its instances are chosen again.
        """
        results, pending = {}, list(items)
        for _attempt in range(ATTEMPTS):
            guesses = self._choose_round(pending, results)
            if guesses is None:
                continue  # the view was stale: read again, choose again
            lost = []
            for host, entries in guesses.items():
                for start in range(0, len(entries), TXN_INSTANCES):
                    chunk = entries[start:start + TXN_INSTANCES]
                    if self._reserve(host, chunk):
                        results.update({name: (host, record["reason"], True) for name, record in chunk})
                    else:
                        lost += [name for name, _record in chunk]
            if not lost:
                return results
            pending = [item for item in pending if item[0] in lost]
        raise Conflict("placement lost %d races with other controllers (instances %s); try again"
                       % (ATTEMPTS, ", ".join(item[0] for item in pending)), instances=[item[0] for item in pending])

    def _choose_round(self, pending, results):
        """``{host: [(name, record)]}`` chosen for the ``pending`` items not placed yet; None after a NoCapacity
        that a stale view may have caused (the view is read again)."""
        guesses = {}
        for name, demand, pinned, reason in pending:
            placed = self.placement_of(name)
            if placed is not None:
                results[name] = (placed["host"], placed.get("reason"), False)
                continue
            try:
                host, why = self.choose(name, demand, pinned, reason, guesses)
            except NoCapacity:
                if self.fresh:
                    raise
                self.read()  # hosts this view has not seen since it was read may have room again
                return None
            guesses.setdefault(host, []).append((name, dict(demand, host=host, reason=why,
                                                            time=utc_iso(time.time()))))
        return guesses

    def _reserve(self, host, entries):
        """One txn: create the placements of ``entries`` and add them to ``host``'s ledger, if all is as seen."""
        view = self.current()
        ledger, ledger_rev = view["ledgers"].get(host, ({"instances": {}}, 0))
        ledger = {"instances": dict(ledger.get("instances") or {},
                                    **{name: reservation(record) for name, record in entries})}
        where = {ledger_key(host): ("ledgers", host), records.host_key(host): ("hosts", host)}
        where.update({placement_key(name): ("placements", name) for name, _record in entries})
        expect = {ledger_key(host): ledger_rev, records.host_key(host): view["hosts"].get(host, (None, 0))[1]}
        expect.update({placement_key(name): 0 for name, _record in entries})
        put = {placement_key(name): record for name, record in entries}
        put[ledger_key(host)] = ledger
        written, answer = self.store.transact(expect=expect, put=put)
        if written:
            view["placements"].update({name: (record, answer) for name, record in entries})
            view["ledgers"][host] = (ledger, answer)
            return True
        # What the txn compared, as it is now: the next choice sees the other controller's write. No pause: a
        # loser that waited would keep losing to the winner's next placement.
        self.fresh = False
        for path, (value, revision) in answer.items():
            folder, key = where[path]
            if value is None:
                view[folder].pop(key, None)
            else:
                view[folder][key] = (value, revision)
        return False

    def release(self, name):
        """Drop instance ``name``'s placement and its reservation in one txn; the host it was on, or None."""
        for _attempt in range(ATTEMPTS):
            placed, placed_rev = self.store.get_with_revision(placement_key(name))
            if placed is None:
                return None
            host = placed["host"]
            ledger, ledger_rev = self.store.get_with_revision(ledger_key(host))
            remaining = {other: entry for other, entry in ((ledger or {}).get("instances") or {}).items()
                         if other != name}
            written, _revision = self.store.transact(
                expect={placement_key(name): placed_rev, ledger_key(host): ledger_rev},
                put={ledger_key(host): {"instances": remaining}} if remaining else {},
                delete=[placement_key(name)] + ([] if remaining else [ledger_key(host)]))
            if written:
                self.view = None
                return host
        raise Conflict("instance %s: releasing its placement lost %d races; try again" % (name, ATTEMPTS),
                       instance=name)


def reservation(record):
    """The ledger entry of a placement record: the amounts and the groups."""
    return {key: record.get(key) for key in RESOURCES + ("anti_affinity", "affinity")}
