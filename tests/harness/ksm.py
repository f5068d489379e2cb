"""The real /sys/kernel/mm/ksm: snapshot, restore, and the lock that keeps KSM tests apart."""

import contextlib
import fcntl
from pathlib import Path

KSM = Path("/sys/kernel/mm/ksm")
# Every test, bench or role run that tunes KSM takes it, so two never tune KSM at the same time.
LOCK = Path("/run/lock/smallcloud-ksm-tests.lock")
# Written at the end, in this order: the ones the kernel takes only while nothing is merged first.
NEED_EMPTY = ("merge_across_nodes", "max_page_sharing")


def read(name):
    return (KSM / name).read_text().strip()


def write(name, value):
    (KSM / name).write_text(str(value))


def parsed(path):
    """A sysfs value as text; a choice file (``[none] scan-time``) as its selected word."""
    text = path.read_text().strip()
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text


def writable_settings():
    """Every setting file of the real KSM directory, with its value now."""
    return {path.name: parsed(path) for path in sorted(KSM.iterdir()) if path.stat().st_mode & 0o200}


def restore(original):
    """Put every KSM setting back; unmerge first when the kernel would refuse a value otherwise."""
    current = writable_settings()
    if any(current[name] != original[name] for name in NEED_EMPTY if name in original):
        write("run", 2)
    for name in (*NEED_EMPTY, *sorted(original)):
        if name in original and name != "run" and parsed(KSM / name) != original[name]:
            write(name, original[name])
    write("run", original["run"])


@contextlib.contextmanager
def ksm_locked_and_restored():
    """Hold the KSM lock; afterwards put every writable KSM setting back as it was (yields the snapshot)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        original = writable_settings()
        try:
            yield original
        finally:
            restore(original)
