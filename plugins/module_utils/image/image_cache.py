# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``image_cache`` module's logic: list entries, verify them, prune unused and corrupt ones.

An entry is never removed while an instance disk under ``instance_dirs`` has it in its backing
chain (``qemu-img info --backing-chain``), whatever its age or state.
"""

import os
import re
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_store as store
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import IMAGE_CACHE_ARGS, with_common
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan

DEFAULT_INSTANCE_DIRS = ["/var/lib/smallcloud/instances", "/var/lib/libvirt/images"]
# Matches the DOCUMENTATION of plugins/modules/image_cache.py.
MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            verify=dict(type="bool", default=False),
            remove_corrupt=dict(type="bool", default=False),
            max_age=dict(type="str"),
            instance_dirs=dict(type="list", elements="path", default=DEFAULT_INSTANCE_DIRS),
            remove=dict(type="list", elements="str", default=[]),
        ),
        IMAGE_CACHE_ARGS,
    ),
    supports_check_mode=True,
)
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
QCOW2_MAGIC = b"QFI\xfb"
LOCK_WAIT = 30


def parse_age(value):
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds -> seconds (None stays None)."""
    if value is None:
        return None
    match = re.match(r"^\s*(\d+)\s*([smhdw]?)\s*$", str(value))
    if not match:
        raise InvalidInput(
            "max_age %r is not a duration: a number with an optional unit s, m, h, d or w (e.g. 30d)" % (value,),
            max_age=value,
            allowed="<number>[s|m|h|d|w]",
        )
    return int(match.group(1)) * AGE_UNITS[match.group(2) or "s"]


def check_keys(keys):
    """Raise InvalidInput for any name that is not an entry key (nothing may name a path)."""
    for key in keys:
        if not re.match(r"^[0-9a-f]{64}$", key or ""):
            raise InvalidInput(
                "remove: %r is not a cache entry key (64 hex digits, as image_cache lists in entries[].key)" % (key,),
                remove=key,
            )


def inspect(entry, verify, now):
    """One entry as the result lists it, with ``status`` ok or corrupt and the ``problem``."""
    meta = entry.read_metadata() or {}
    info = {
        "key": entry.key,
        "path": entry.path,
        "url": meta.get("url"),
        "format": entry.format,
        "size": meta.get("size"),
        "disk_usage": store.disk_usage(entry.path),
        "virtual_size": meta.get("virtual_size"),
        "last_used": meta.get("last_used"),
        "verified": False,
        "status": "ok",
        "problem": None,
        "in_use_by": [],
    }
    info["problem"] = _problem(entry, meta, verify, info)
    if info["problem"]:
        info["status"] = "corrupt"
    used = meta.get("last_used") or _mtime(entry)
    info["age"] = max(0, int(now - used)) if used else None
    return info


def _problem(entry, meta, verify, info):
    """What is wrong with an entry, or None: missing pieces, wrong size, wrong digest."""
    if not meta:
        return "metadata %s is missing or unreadable" % entry.meta_path
    try:
        size = os.stat(entry.path).st_size
    except OSError:
        return "image file %s is missing" % entry.path
    if size != meta.get("size"):
        return "size is %d bytes, metadata says %s" % (size, meta.get("size"))
    if verify:
        actual = store.file_sha256(entry.path)
        info["verified"] = True
        if actual != meta.get("file_digest"):
            return "digest is %s, metadata says %s" % (actual, meta.get("file_digest"))
    return None


def _mtime(entry):
    for path in (entry.meta_path, entry.path):
        try:
            return os.stat(path).st_mtime
        except OSError:
            pass
    return None


def backing_users(instance_dirs, warn):
    """Map of real path -> instance disks whose backing chain includes it."""
    users = {}
    for disk in _qcow2_files(instance_dirs):
        for backing in _backing_files(disk, warn):
            users.setdefault(backing, []).append(disk)
    return users


def _qcow2_files(instance_dirs):
    for top in instance_dirs:
        for dirpath, _dirs, files in os.walk(top):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as handle:
                        if handle.read(4) == QCOW2_MAGIC:
                            yield path
                except OSError:
                    continue


def _backing_files(disk, warn):
    """Real paths of every file below ``disk`` in its backing chain."""
    try:
        chain = store.image_info(disk, backing_chain=True)
    except HostError:
        # A broken chain (a backing file already gone) still names its first backing file.
        try:
            chain = [store.image_info(disk)]
        except HostError as error:
            warn("cannot read the backing chain of %s: %s" % (disk, error.msg))
            return []
    found = []
    for layer in chain if isinstance(chain, list) else [chain]:
        backing = layer.get("full-backing-filename") or layer.get("backing-filename")
        if backing:
            base = os.path.dirname(layer.get("filename") or disk)
            found.append(os.path.realpath(os.path.join(base, backing)))
    return found


def _removals(entries, params, max_age):
    """(entry, reason) pairs to remove, and (key, reason) pairs kept because a disk uses them."""
    remove, kept = [], []
    explicit = set(params.get("remove") or [])
    for entry, info in entries:
        reason = None
        if entry.key in explicit:
            reason = "listed in remove"
        elif info["status"] == "corrupt" and params.get("remove_corrupt"):
            reason = "corrupt: %s" % info["problem"]
        elif max_age is not None and info["age"] is not None and info["age"] > max_age:
            reason = "unused for %d s (max_age %d s)" % (info["age"], max_age)
        if reason is None:
            continue
        if info["in_use_by"]:
            if entry.key in explicit:
                users = ", ".join(info["in_use_by"])
                raise HostError(
                    "cache entry %s (%s) backs %s; not removing it" % (entry.key, info["url"], users),
                    key=entry.key,
                    in_use_by=info["in_use_by"],
                )
            kept.append({"key": entry.key, "url": info["url"], "reason": "backs %s" % ", ".join(info["in_use_by"])})
            continue
        remove.append((entry, info, reason))
    return remove, kept


def _remove_locked(entry):
    with store.EntryLock(entry.lock_path, timeout=LOCK_WAIT):
        entry.remove()
        entry.remove_stale_partials()


def run(module):
    """Entry point of the image_cache module: inspect, decide, remove (unless check mode)."""
    params = module.params
    max_age = parse_age(params.get("max_age"))
    check_keys(params.get("remove") or [])
    cache_dir = params["cache_dir"]
    now = time.time()
    entries = [(entry, inspect(entry, params.get("verify"), now)) for entry in store.list_entries(cache_dir)]
    users = backing_users(params.get("instance_dirs") or [], module.warn) if entries else {}
    for entry, info in entries:
        info["in_use_by"] = sorted(users.get(os.path.realpath(entry.path), []))
    remove, kept = _removals(entries, params, max_age)
    plan = Plan()
    before = sorted(entry.name for entry, _info in entries)
    gone = {entry.name for entry, _info, _reason in remove}
    plan.compare("entries", before, [name for name in before if name not in gone])
    for entry, info, reason in remove:
        plan.add("remove %s (%s): %s" % (entry.name, info["url"], reason), _remove_locked, entry)
    plan.apply(module.check_mode)
    listed = [info for _entry, info in entries]
    return plan.result(
        entries=listed,
        count=len(listed),
        total_size=sum(info["size"] or 0 for info in listed),
        total_disk_usage=sum(info["disk_usage"] for info in listed),
        corrupt=[info["key"] for info in listed if info["status"] == "corrupt"],
        removed=[
            {"key": entry.key, "path": entry.path, "url": info["url"], "reason": reason}
            for entry, info, reason in remove
        ],
        kept=kept,
    )
