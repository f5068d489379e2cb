# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The cloud's state store: JSON records, allocators, locks and event logs in etcd.

Every module that keeps state goes through ``Store``::

    store = Store.from_params(module.params)      # the shared etcd_* options (args.ETCD_ARGS)
    vni = store.allocate_vni("network/web")
    with store.lock("network/web"):              # held on a lease of etcd_lock_ttl seconds
        record = store.get("networks/web")

Paths are relative to ``etcd_prefix`` (default ``/smallcloud/v1``) and made of ``/``-separated
segments (build them from user input with ``path_join``, which refuses a ``/`` inside a name);
values are anything JSON can hold. Layout (one top-level folder per kind of record)::

    networks/NAME  instances/NAME  hosts/NAME  images/NAME   records written by the modules
    vni/VNI                      VXLAN ids                     -> {"owner": ..., "time": ...}
    ipam/NETWORK/ADDRESS         addresses of a network's CIDR -> {"owner": ..., "time": ...}
    mac/MAC                      MAC addresses (allocators.MAC_PREFIX, locally administered)
    floating/POOL/ADDRESS        floating IPs; POOL is the pool CIDR with "/" as "_" (pool_key)
    locks/NAME                   lock keys, attached to a lease
    events/KIND/NAME/STAMP       per-object event log, trimmed to ``events_max`` entries

Nothing connects until the first request. Every allocation is one etcd transaction that creates the
key only if it does not exist (create_revision == 0), so parallel controllers never hand out the same
value; a collision is retried with another candidate. Allocation is not idempotent by owner: keep the
value in the owner's own record, and ask for it again with ``requested`` (which returns a value the
same owner already holds); ``held_by`` finds the values of a run that died before recording them.
Release is idempotent. The usual shape in a module's apply step (never in check mode)::

    with store.lock("network/" + name):
        record = store.get(path_join("networks", name))
        if record is None:
            vni = store.allocate_vni("network/" + name, requested=params["vni"])
            try:
                store.put(path_join("networks", name), {"vni": vni, "cidr": cidr})
            except StoreError:
                store.release_vni(vni, owner="network/" + name)
                raise
        store.log_event("network", name, "created with VNI %d" % vni)

Errors are the typed ones of errors.py: StoreUnreachable (every endpoint tried, with reasons),
StoreAuthError (credentials or TLS refused), PoolExhausted (``pool`` names it), Conflict (``owner``
names the holder), LockTimeout (``lock`` and ``holder``), InvalidInput (a bad name, CIDR, VNI, MAC).
"""

import contextlib
import datetime
import json
import os
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.state.allocators import (
    MAC_PREFIX,  # noqa: F401 - re-exported: callers document the MAC prefix from here
    SYSTEM_RANDOM,
    VNI_MAX,
    VNI_MIN,
    AddressPool,
    check_vni,
    normalize_ipv4,
    normalize_mac,
    pick_free,
    pool_key,
    random_mac,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import (
    Conflict,
    InvalidInput,
    PoolExhausted,
    StoreError,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import (
    EtcdGateway,
    b64,
    range_end,
    unb64,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.locks import Lock

DEFAULT_PREFIX = "/smallcloud/v1"
DEFAULT_ENDPOINTS = ["http://127.0.0.1:2379"]
CLIENT_FILE_KEYS = ("endpoints", "ca_cert", "cert", "key")


def client_settings(params):
    """Endpoints and TLS files: the module's own options when it names endpoints; else the client file the
    deploy playbook writes on every hypervisor (``etcd_client_config``, JSON with CLIENT_FILE_KEYS), with the
    module's TLS options winning key by key; else loopback etcd."""
    settings = {"endpoints": params.get("etcd_endpoints"), "ca_cert": params.get("etcd_ca_cert"),
                "cert": params.get("etcd_cert"), "key": params.get("etcd_key")}
    path = params.get("etcd_client_config")
    if not settings["endpoints"] and path and os.path.exists(path):
        from_file = read_client_file(path)
        settings = {key: settings[key] or from_file.get(key) for key in CLIENT_FILE_KEYS}
    settings["endpoints"] = settings["endpoints"] or DEFAULT_ENDPOINTS
    return settings


def read_client_file(path):
    """The settings of an etcd client file; InvalidInput naming the file when it is not one."""
    allowed = "a JSON object with keys %s" % ", ".join(CLIENT_FILE_KEYS)
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError) as error:
        raise InvalidInput("etcd_client_config %s cannot be read (%s); expected %s" % (path, error, allowed),
                           etcd_client_config=path) from error
    unknown = sorted(set(content) - set(CLIENT_FILE_KEYS)) if isinstance(content, dict) else None
    if unknown is None or unknown or not isinstance(content.get("endpoints", []), list):
        raise InvalidInput("etcd_client_config %s is not %s (endpoints a list)%s"
                           % (path, allowed, "; unknown keys: %s" % ", ".join(unknown) if unknown else ""),
                           etcd_client_config=path)
    return content


EVENTS_MAX = 100
DEFAULT_LOCK_TTL = 60  # seconds a dead holder's lock outlives it (etcd_lock_ttl)
MAX_ATTEMPTS = 64  # collisions tolerated per allocation before giving up

# etcd options -> EtcdGateway, while shared_gateways() is on (None: every Store gets its own gateway).
_SHARED_GATEWAYS = None


@contextlib.contextmanager
def shared_gateways():
    """Within: every Store made from the same etcd options shares one gateway, so one HTTP session (one TLS
    handshake) per endpoint. For runners called one after another in one process (cloud_plan), each of which
    makes its own Store; a lock's keep-alive thread still clones its own."""
    global _SHARED_GATEWAYS  # noqa: PLW0603 - on for the duration of the block only
    _SHARED_GATEWAYS = {}
    try:
        yield
    finally:
        _SHARED_GATEWAYS = None


def path_join(*segments):
    """``a/b/c`` from segments; InvalidInput when one is empty, ``.``/``..`` or contains ``/``."""
    parts = []
    for segment in segments:
        text = str(segment) if isinstance(segment, int) and not isinstance(segment, bool) else segment
        if not isinstance(text, str) or not text or "/" in text or text in (".", "..") or "\0" in text:
            raise InvalidInput(
                "name %r cannot be part of a store path; expected a non-empty name without '/'" % (segment,),
                name=segment,
            )
        parts.append(text)
    return "/".join(parts)


def floating_folder(pool_cidr):
    """The allocation folder of the floating pool ``pool_cidr`` (for ``Store.held_by``)."""
    return path_join("floating", pool_key(pool_cidr))


def normalize_path(path, allow_empty=False):
    """``path`` without leading/trailing ``/``; InvalidInput on empty segments or ``..``."""
    if not isinstance(path, str):
        raise InvalidInput("store path %r is not a string" % (path,), path=path)
    stripped = path.strip("/")
    if not stripped:
        if allow_empty:
            return ""
        raise InvalidInput("store path %r is empty; expected e.g. networks/NAME" % (path,), path=path)
    try:
        return path_join(*stripped.split("/"))
    except InvalidInput:
        raise InvalidInput(
            "store path %r has an empty, '.' or '..' segment; expected e.g. networks/NAME" % (path,), path=path
        ) from None


def normalize_prefix(prefix):
    """The etcd key prefix as ``/a/b`` (leading ``/``, no trailing one); InvalidInput otherwise."""
    error = InvalidInput(
        "etcd_prefix %r is not valid; expected an absolute key path like /smallcloud/v1" % (prefix,), etcd_prefix=prefix
    )
    if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.strip("/"):
        raise error
    try:
        return "/" + normalize_path(prefix)
    except InvalidInput:
        raise error from None


def utc_iso(timestamp):
    """``timestamp`` (seconds since the epoch) as ISO-8601 UTC with microseconds, e.g. 2026-01-02T03:04:05.000006Z."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_owner(owner):
    """``owner`` if it is a non-empty string, else InvalidInput."""
    if not isinstance(owner, str) or not owner.strip():
        raise InvalidInput("allocation owner %r is not valid; expected a non-empty string" % (owner,), owner=owner)
    return owner


def _owner_of(record):
    """The owner named in an allocation record (or the record itself when it is not ours)."""
    return record.get("owner") if isinstance(record, dict) else record


class Store:
    """JSON records under one etcd prefix, with allocators, locks and event logs."""

    def __init__(self, gateway, prefix=DEFAULT_PREFIX, events_max=EVENTS_MAX, lock_ttl=DEFAULT_LOCK_TTL):
        if isinstance(events_max, bool) or not isinstance(events_max, int) or events_max < 1:
            raise InvalidInput("events_max %r is not valid; expected an integer >= 1" % (events_max,))
        if isinstance(lock_ttl, bool) or not isinstance(lock_ttl, int) or lock_ttl < 1:
            raise InvalidInput("etcd_lock_ttl %r is not valid; expected whole seconds >= 1" % (lock_ttl,),
                               etcd_lock_ttl=lock_ttl)
        self.gateway = gateway
        self.lock_ttl = lock_ttl
        self.prefix = normalize_prefix(prefix)
        self.events_max = events_max
        self._taken = {}  # pool folder key -> set of taken addresses, as this Store last saw them

    @classmethod
    def from_params(cls, params, **options):
        """A Store from a module's params (the keys of args.ETCD_ARGS); no connection yet."""
        settings = client_settings(params)
        connection = dict(ca_cert=settings["ca_cert"], cert=settings["cert"], key=settings["key"],
                          user=params.get("etcd_user"), password=params.get("etcd_password"),
                          timeout=params.get("etcd_timeout") or 10)
        shared = _SHARED_GATEWAYS if _SHARED_GATEWAYS is not None else {}
        same = json.dumps([settings["endpoints"], connection], sort_keys=True)
        gateway = shared.get(same)
        if gateway is None:
            gateway = shared[same] = EtcdGateway(settings["endpoints"], **connection)
        lock_ttl = params.get("etcd_lock_ttl")
        return cls(gateway, prefix=params.get("etcd_prefix") or DEFAULT_PREFIX,
                   lock_ttl=DEFAULT_LOCK_TTL if lock_ttl is None else lock_ttl, **options)

    # keys ------------------------------------------------------------------------------------

    def key(self, path):
        """The full etcd key of ``path``."""
        return "%s/%s" % (self.prefix, normalize_path(path))

    def folder(self, path_prefix):
        """The full etcd key prefix of the folder ``path_prefix`` (ends with ``/``)."""
        path = normalize_path(path_prefix, allow_empty=True)
        return "%s/%s/" % (self.prefix, path) if path else self.prefix + "/"

    def _txn(self, compare, success, failure=()):
        """One etcd transaction; the gateway's answer."""
        return self.gateway.call(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )

    def _range(self, key, end=None, **options):
        """The kvs of a range request."""
        payload = {"key": b64(key)}
        if end is not None:
            payload["range_end"] = b64(end)
        payload.update(options)
        return self.gateway.call("kv/range", payload).get("kvs") or []

    @staticmethod
    def _decode(kv):
        """The JSON value of a gateway kv; StoreError naming the key when it is not JSON."""
        raw = unb64(kv.get("value"))
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            key = unb64(kv.get("key")).decode("utf-8", "replace")
            raise StoreError("etcd key %s does not hold JSON: %r" % (key, raw[:80]), key=key) from None

    @staticmethod
    def _encode(value):
        """``value`` as compact, sorted JSON (so equal records are equal bytes)."""
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    # records ---------------------------------------------------------------------------------

    def status(self):
        """The answering member's status: endpoint, etcd version, leader and member ids, db size."""
        answer = self.gateway.call("maintenance/status", {})
        return {
            "endpoint": self.gateway.endpoint.url,
            "version": answer.get("version"),
            "member_id": answer.get("header", {}).get("member_id"),
            "leader": answer.get("leader"),
            "db_size": int(answer.get("dbSize", 0) or 0),
        }

    def get(self, path):
        """The JSON value at ``path``, or None when there is no such key."""
        return self.get_with_revision(path)[0]

    def get_with_revision(self, path):
        """``(value, mod_revision)`` at ``path``; ``(None, 0)`` when absent."""
        kvs = self._range(self.key(path))
        if not kvs:
            return None, 0
        return self._decode(kvs[0]), int(kvs[0].get("mod_revision", 0))

    def put(self, path, value):
        """Write ``value`` (JSON) at ``path`` unconditionally."""
        self.gateway.call("kv/put", {"key": b64(self.key(path)), "value": b64(self._encode(value))})

    def create(self, path, value):
        """Write ``value`` only if ``path`` does not exist (one txn); True when this call created it."""
        return self.compare_and_swap(path, 0, value)

    def compare_and_swap(self, path, mod_revision, value):
        """Write ``value`` only if ``path`` is still at ``mod_revision`` (0: still absent); True on success."""
        key = b64(self.key(path))
        answer = self._txn(
            [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": int(mod_revision)}],
            [{"request_put": {"key": key, "value": b64(self._encode(value))}}],
        )
        return bool(answer.get("succeeded"))

    def delete(self, path, mod_revision=None):
        """Delete ``path`` (only if still at ``mod_revision`` when given); True when a key was deleted."""
        key = b64(self.key(path))
        if mod_revision is None:
            return int(self.gateway.call("kv/deleterange", {"key": key}).get("deleted", 0)) > 0
        answer = self._txn(
            [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": int(mod_revision)}],
            [{"request_delete_range": {"key": key}}],
        )
        if not answer.get("succeeded"):
            return False
        return int(answer["responses"][0]["response_delete_range"].get("deleted", 0)) > 0

    def transact(self, expect, put=None, delete=()):
        """Write ``put`` (``{path: value}``) and delete the paths of ``delete`` in one txn, only if every path of
        ``expect`` (``{path: mod_revision}``, 0 for "absent") is still at that revision.

        ``(True, revision of the write)``; or, when another writer came first, ``(False, {path: (value,
        mod_revision)})``: what the ``expect`` paths hold now, read in the same round trip.
        """
        paths = list(expect)
        answer = self._txn(
            [{"key": b64(self.key(path)), "result": "EQUAL", "target": "MOD", "mod_revision": int(expect[path])}
             for path in paths],
            [{"request_put": {"key": b64(self.key(path)), "value": b64(self._encode(value))}}
             for path, value in (put or {}).items()]
            + [{"request_delete_range": {"key": b64(self.key(path))}} for path in delete],
            [{"request_range": {"key": b64(self.key(path))}} for path in paths],
        )
        if answer.get("succeeded"):
            return True, int(answer.get("header", {}).get("revision", 0))
        now = {}
        for path, response in zip(paths, answer.get("responses") or []):
            kvs = response["response_range"].get("kvs") or []
            now[path] = (self._decode(kvs[0]), int(kvs[0].get("mod_revision", 0))) if kvs else (None, 0)
        return False, now

    def list_with_revisions(self, *path_prefixes):
        """``[{relative_path: (value, mod_revision)}]``, one per folder, read together in one round trip (a
        txn of ranges: one consistent revision for all of them)."""
        folders = [self.folder(path) for path in path_prefixes]
        answer = self._txn([], [{"request_range": {"key": b64(folder), "range_end": b64(range_end(folder))}}
                                for folder in folders])
        return [{unb64(kv["key"]).decode("utf-8")[len(folder):]: (self._decode(kv), int(kv.get("mod_revision", 0)))
                 for kv in response["response_range"].get("kvs") or []}
                for folder, response in zip(folders, answer.get("responses") or [])]

    def list(self, path_prefix):
        """``{relative_path: value}`` for every key below the folder ``path_prefix``."""
        folder = self.folder(path_prefix)
        return {
            unb64(kv["key"]).decode("utf-8")[len(folder) :]: self._decode(kv)
            for kv in self._range(folder, range_end(folder))
        }

    def keys(self, path_prefix):
        """The relative paths below the folder ``path_prefix``, sorted (values are not fetched)."""
        return self._relative_keys(self.folder(path_prefix))

    def _relative_keys(self, folder):
        """The keys below the full key prefix ``folder``, relative to it."""
        return [
            unb64(kv["key"]).decode("utf-8")[len(folder) :]
            for kv in self._range(folder, range_end(folder), keys_only=True)
        ]

    def delete_prefix(self, path_prefix):
        """Delete every key below the folder ``path_prefix``; the number deleted."""
        if not normalize_path(path_prefix, allow_empty=True):
            raise InvalidInput("refusing to delete the whole store; name a folder such as networks/", path=path_prefix)
        folder = self.folder(path_prefix)
        answer = self.gateway.call("kv/deleterange", {"key": b64(folder), "range_end": b64(range_end(folder))})
        return int(answer.get("deleted", 0))

    # locks -----------------------------------------------------------------------------------

    def lock(self, name, ttl=None, timeout=60):
        """A context manager holding lock ``name`` on an etcd lease of ``ttl`` s (kept alive while held; default
        the store's ``lock_ttl``, the operator's etcd_lock_ttl).

        Waits up to ``timeout`` s, then raises LockTimeout naming the lock and its holder. A holder that
        dies stops renewing, so its lock frees itself after ``ttl`` s. Not re-entrant.
        """
        ttl = self.lock_ttl if ttl is None else ttl
        return Lock(self.gateway, self.key("locks/" + normalize_path(name)), normalize_path(name), ttl, timeout)

    # allocators ------------------------------------------------------------------------------

    def _claim(self, path, owner, scan_folder=None):
        """Create ``path`` with ``owner``'s record if absent, in one txn.

        ``(True, None)`` when created; else ``(False, found)``: the current record at ``path``, or,
        with ``scan_folder``, the relative keys of that folder read in the same round trip.
        """
        key = self.key(path)
        record = {"owner": owner, "time": utc_iso(time.time())}
        lookups = [{"request_range": {"key": b64(key)}}]
        if scan_folder is not None:
            scan = {"key": b64(scan_folder), "range_end": b64(range_end(scan_folder)), "keys_only": True}
            lookups.append({"request_range": scan})
        answer = self._txn(
            [{"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            [{"request_put": {"key": b64(key), "value": b64(self._encode(record))}}],
            lookups,
        )
        if answer.get("succeeded"):
            return True, None
        current = answer["responses"][0]["response_range"].get("kvs") or []
        current = self._decode(current[0]) if current else None
        if current == record:
            # Our own write: it committed on a member whose answer was lost, then failover repeated it.
            return True, None
        if scan_folder is None:
            return False, current
        kvs = answer["responses"][1]["response_range"].get("kvs") or []
        return False, [unb64(kv["key"]).decode("utf-8")[len(scan_folder) :] for kv in kvs]

    def _claim_requested(self, path, owner, what):
        """Claim one named value: True if created or already ``owner``'s; Conflict naming the holder otherwise."""
        for _attempt in range(3):
            created, record = self._claim(path, owner)
            if created or _owner_of(record) == owner:
                return created
            if record is not None:
                raise Conflict(
                    "%s is taken by %s" % (what, _owner_of(record)),
                    value=path.rsplit("/", 1)[-1],
                    owner=_owner_of(record),
                )
        raise Conflict("%s is being allocated and released concurrently; try again" % what)

    def _claim_random(self, folder_path, candidate, owner, what):
        """Claim ``candidate()`` values under ``folder_path`` until one is free (huge, sparse spaces)."""
        for _attempt in range(MAX_ATTEMPTS):
            value = candidate()
            created, _record = self._claim(folder_path + "/" + path_join(value), owner)
            if created:
                return value
        raise PoolExhausted("no free %s found in %d random tries" % (what, MAX_ATTEMPTS), pool=what)

    def _release(self, path, owner, what):
        """Delete the allocation at ``path``; with ``owner``, only when it is ``owner``'s. True when deleted."""
        if owner is None:
            return self.delete(path)
        for _attempt in range(MAX_ATTEMPTS):
            record, revision = self.get_with_revision(path)
            if record is None:
                return False
            if _owner_of(record) != owner:
                raise Conflict(
                    "%s belongs to %s, not %s; not released" % (what, _owner_of(record), owner),
                    owner=_owner_of(record),
                )
            if self.delete(path, mod_revision=revision):
                return True
        raise Conflict("%s changed during every release attempt; try again" % what)

    def held_by(self, folder_path, owner):
        """The values of the allocation folder ``folder_path`` (e.g. ``vni``, ``ipam/NETWORK``) held by ``owner``.

        A run killed between allocating a value and recording it in its owner's record leaves the value held:
        the owner's next run asks for it again (``requested``) instead of leaking it.
        """
        return sorted(key for key, record in self.list(folder_path).items()
                      if "/" not in key and _owner_of(record) == owner)

    def allocate_vni(self, owner, requested=None):
        """A free VXLAN id (random in 1..16777215) recorded for ``owner``.

        ``requested`` asks for one id: returned if free or already ``owner``'s, else Conflict naming its owner.
        """
        _check_owner(owner)
        if requested is not None:
            vni = check_vni(requested)
            self._claim_requested(path_join("vni", vni), owner, "VNI %d" % vni)
            return vni
        return self._claim_random("vni", lambda: SYSTEM_RANDOM.randint(VNI_MIN, VNI_MAX), owner, "VNI")

    def release_vni(self, vni, owner=None):
        """Free ``vni`` (idempotent); with ``owner``, only if it is ``owner``'s (else Conflict). True when freed."""
        vni = check_vni(vni)
        return self._release(path_join("vni", vni), owner, "VNI %d" % vni)

    def _allocate_address(self, folder_path, pool, pool_name, owner, requested):
        """A free address of ``pool``: pick from the known taken set, claim it; a collision rescans in the same txn.

        The taken set (as pool offsets, so picking costs O(1) once known) is read once per Store and
        pool, then kept up to date by this Store's own claims and releases; what other controllers
        took since shows up as a collision, whose failure branch returns the fresh set. A pool that
        looks full from a kept set is read again before PoolExhausted, so addresses others released
        are found.
        """
        _check_owner(owner)
        scan = self.folder(folder_path)
        if requested is not None:
            address = pool.check(requested)
            self._claim_requested(
                folder_path + "/" + path_join(address), owner, "address %s of %s" % (address, pool_name)
            )
            self._kept_offsets(scan, pool).add(pool.offset(address))
            return address
        taken, fresh = self._kept_offsets(scan, pool), False
        for _attempt in range(MAX_ATTEMPTS):
            offset = pick_free(pool.size, taken)
            if offset is None and not fresh:
                taken, fresh = pool.offsets(self.keys(folder_path)), True
                offset = pick_free(pool.size, taken)
            if offset is None:
                raise PoolExhausted(
                    "pool %s is exhausted: all %d assignable addresses are taken" % (pool_name, pool.size),
                    pool=pool_name,
                    size=pool.size,
                )
            address = pool.address(offset)
            created, found = self._claim(folder_path + "/" + path_join(address), owner, scan_folder=scan)
            if created:
                taken.add(offset)
                self._taken[scan] = (pool.network, taken)
                return address
            taken, fresh = pool.offsets(found), True
        raise Conflict("gave up allocating in pool %s after %d collisions" % (pool_name, MAX_ATTEMPTS), pool=pool_name)

    def _kept_offsets(self, scan, pool):
        """The kept taken set of the pool folder ``scan`` (read from etcd the first time)."""
        kept = self._taken.get(scan)
        if kept is None or kept[0] != pool.network:
            kept = (pool.network, pool.offsets(self._relative_keys(scan)))
            self._taken[scan] = kept
        return kept[1]

    def _forget_taken(self, folder_path, address):
        """Drop a released address from the kept taken set of its pool."""
        kept = self._taken.get(self.folder(folder_path))
        if kept is not None:
            kept[1].discard(AddressPool(kept[0]).offset(address))

    def allocate_ip(self, network, cidr, owner, requested=None):
        """A free IPv4 address of ``cidr`` for ``owner`` in ``network``, as a string.

        Never the network address, the gateway (first host) or the broadcast address. PoolExhausted naming
        the network when none is left; ``requested`` as for allocate_vni.
        """
        pool = AddressPool(cidr)
        folder_path = path_join("ipam", network)
        return self._allocate_address(folder_path, pool, "%s (%s)" % (network, pool.network), owner, requested)

    def release_ip(self, network, address, owner=None):
        """Free ``address`` in ``network`` (idempotent); True when freed."""
        address = normalize_ipv4(address)
        released = self._release(path_join("ipam", network, address), owner, "address %s of %s" % (address, network))
        self._forget_taken(path_join("ipam", network), address)
        return released

    def allocate_mac(self, owner, requested=None):
        """A free MAC address ``MAC_PREFIX:xx:xx:xx`` (lower case) for ``owner``; ``requested`` any unicast MAC."""
        _check_owner(owner)
        if requested is not None:
            mac = normalize_mac(requested)
            self._claim_requested(path_join("mac", mac), owner, "MAC %s" % mac)
            return mac
        return self._claim_random("mac", random_mac, owner, "MAC address under %s" % MAC_PREFIX)

    def release_mac(self, mac, owner=None):
        """Free ``mac`` (idempotent); True when freed."""
        mac = normalize_mac(mac)
        return self._release(path_join("mac", mac), owner, "MAC %s" % mac)

    def allocate_floating(self, pool_cidr, owner, requested=None):
        """A free address of the floating pool ``pool_cidr`` for ``owner`` (same rules as allocate_ip)."""
        pool = AddressPool(pool_cidr, what="floating pool")
        folder_path = path_join("floating", pool_key(pool_cidr))
        return self._allocate_address(folder_path, pool, "floating %s" % pool.network, owner, requested)

    def release_floating(self, pool_cidr, address, owner=None):
        """Free ``address`` of the floating pool ``pool_cidr`` (idempotent); True when freed."""
        address = normalize_ipv4(address)
        folder_path = path_join("floating", pool_key(pool_cidr))
        released = self._release(folder_path + "/" + address, owner, "floating address %s of %s" % (address, pool_cidr))
        self._forget_taken(folder_path, address)
        return released

    # events ----------------------------------------------------------------------------------

    def log_event(self, kind, name, message):
        """Append ``message`` to the event log of object ``kind``/``name``; the oldest are trimmed.

        One round trip normally; once the log holds a quarter more than ``events_max`` entries,
        two more trim it back to ``events_max``.
        """
        now = time.time()
        folder = self.folder(path_join("events", kind, name))
        # Nanoseconds then randomness: keys sort by time and never collide between writers.
        stamp = "%019d-%08x" % (int(now * 1e9), SYSTEM_RANDOM.getrandbits(32))
        record = {"time": utc_iso(now), "message": str(message)}
        answer = self._txn(
            [],
            [
                {"request_put": {"key": b64(folder + stamp), "value": b64(self._encode(record))}},
                {"request_range": {"key": b64(folder), "range_end": b64(range_end(folder)), "count_only": True}},
            ],
        )
        count = int(answer["responses"][1]["response_range"].get("count", 0))
        if count > self.events_max + max(1, self.events_max // 4):
            self._trim_events(folder, count - self.events_max)

    def _trim_events(self, folder, excess):
        """Delete the ``excess`` oldest entries of an event log folder."""
        oldest = self._range(
            folder, range_end(folder), keys_only=True, limit=excess, sort_order="ASCEND", sort_target="KEY"
        )
        if oldest:
            last = unb64(oldest[-1]["key"])
            self.gateway.call("kv/deleterange", {"key": b64(folder), "range_end": b64(last + b"\0")})

    def events(self, kind, name):
        """The event log of ``kind``/``name``, oldest first: ``[{"time": ISO-8601 UTC, "message": str}]``."""
        folder = self.folder(path_join("events", kind, name))
        newest = self._range(folder, range_end(folder), limit=self.events_max, sort_order="DESCEND", sort_target="KEY")
        return [self._decode(kv) for kv in reversed(newest)]
