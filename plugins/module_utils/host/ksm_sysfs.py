# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kernel samepage merging (KSM) in sysfs: read the tree, plan setting changes, persist them.

Everything goes through ``sysfs_root`` (``/sys`` on a host, a temporary tree in unit tests).
"""

import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan

KSM_SUBDIR = os.path.join("kernel", "mm", "ksm")
DEFAULT_PERSIST_PATH = "/etc/tmpfiles.d/smallcloud-ksm.conf"

RUN_STATES = {"stopped": 0, "running": 1, "unmerge": 2}
RUN_NAMES = {value: name for name, value in RUN_STATES.items()}

# Limits of what the kernel accepts (mm/ksm.c); sysfs takes unsigned ints.
UINT_MAX = 2 ** 32 - 1
INT_LIMITS = {
    "pages_to_scan": (0, UINT_MAX),
    "sleep_millisecs": (0, UINT_MAX),
    "max_page_sharing": (2, 2 ** 31 - 1),
}
BOOL_SETTINGS = ("merge_across_nodes", "use_zero_pages", "smart_scan")

# The order writes happen in, and the order of the tmpfiles.d lines: settings that need an empty
# stable tree first, the scanner's pace next, ``run`` last.
SETTINGS = ("merge_across_nodes", "max_page_sharing", "use_zero_pages", "smart_scan",
            "pages_to_scan", "sleep_millisecs", "run")
# The kernel refuses these (EBUSY) while any page is merged: unmerge first, change, restore run.
NEED_EMPTY = ("merge_across_nodes", "max_page_sharing")

# Read-only files; every other file in the directory is a setting.
COUNTERS = ("full_scans", "general_profit", "ksm_zero_pages", "pages_scanned", "pages_shared",
            "pages_sharing", "pages_skipped", "pages_unshared", "pages_volatile",
            "stable_node_chains", "stable_node_dups")

# Scanner pace per preset: pages_to_scan pages every sleep_millisecs. The CPU figures are in the
# module documentation (measured with bench/ksm_merge.py).
PRESETS = {
    "kernel_defaults": {"pages_to_scan": 100, "sleep_millisecs": 20},
    "balanced": {"pages_to_scan": 1000, "sleep_millisecs": 20},
    "aggressive": {"pages_to_scan": 10000, "sleep_millisecs": 10},
}


def ksm_dir(sysfs_root):
    """The KSM directory under ``sysfs_root``; HostError when the kernel has none."""
    path = os.path.join(sysfs_root, KSM_SUBDIR)
    if not os.path.isdir(path):
        raise HostError("this kernel has no KSM: CONFIG_KSM is not set (%s does not exist)" % path, path=path)
    return path


def _parse(text):
    """A sysfs value: an int, the selected word of a ``[a] b`` choice list, or the raw text."""
    text = text.strip()
    if "[" in text and "]" in text:
        return text[text.index("[") + 1:text.index("]")]
    try:
        return int(text)
    except ValueError:
        return text


def read_all(sysfs_root):
    """Every file of the KSM directory, parsed: name -> value."""
    path = ksm_dir(sysfs_root)
    values = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        try:
            with open(full) as handle:
                values[name] = _parse(handle.read())
        except OSError as error:
            raise HostError("cannot read %s: %s" % (full, error), path=full) from error
    return values


def settings_view(raw):
    """The managed settings in module terms (booleans, run by name); absent files left out."""
    view = {}
    for name in SETTINGS:
        if name not in raw:
            continue
        value = raw[name]
        if name == "run":
            value = RUN_NAMES.get(value, value)
        elif name in BOOL_SETTINGS:
            value = bool(value)
        view[name] = value
    return view


def page_size():
    """The host's page size in bytes."""
    return os.sysconf("SC_PAGE_SIZE")


def info(sysfs_root):
    """Everything ksm_info reports: settings, counters and derived figures."""
    raw = read_all(sysfs_root)
    counters = {k: v for k, v in raw.items() if k in COUNTERS}
    settings = {k: v for k, v in raw.items() if k not in COUNTERS}
    size = page_size()
    shared = counters.get("pages_shared", 0)
    sharing = counters.get("pages_sharing", 0)
    return {
        "available": True,
        "path": ksm_dir(sysfs_root),
        "run": RUN_NAMES.get(raw.get("run"), raw.get("run")),
        "running": raw.get("run") == 1,
        "settings": settings,
        "counters": counters,
        "page_size": size,
        "memory_saved_bytes": sharing * size,
        "zero_pages_bytes": counters.get("ksm_zero_pages", 0) * size,
        "sharing_ratio": round(float(sharing) / shared, 3) if shared else 0.0,
        "full_scans": counters.get("full_scans", 0),
    }


def _check_int(name, value):
    """``value`` as an int within the kernel's limits for ``name``, else InvalidInput."""
    low, high = INT_LIMITS[name]
    allowed = "%d..%d" % (low, high)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("%s=%r is not an integer: allowed are integers from %d to %d" % (name, value, low, high),
                           option=name, value=value, allowed=allowed)
    if not low <= value <= high:
        raise InvalidInput("%s=%d is out of range: allowed are integers from %d to %d" % (name, value, low, high),
                           option=name, value=value, allowed=allowed)
    return value


def desired_settings(params):
    """Validate the module options; return the settings to enforce (unset ones left out)."""
    preset = params.get("preset")
    if preset is not None and preset not in PRESETS:
        raise InvalidInput("preset=%r is unknown: allowed are %s" % (preset, ", ".join(sorted(PRESETS))),
                           option="preset", value=preset, allowed=sorted(PRESETS))
    desired = dict(PRESETS.get(preset, {}))
    run = params.get("run")
    if run is not None:
        if run not in RUN_STATES:
            raise InvalidInput("run=%r is not allowed: allowed are %s" % (run, ", ".join(RUN_STATES)),
                               option="run", value=run, allowed=list(RUN_STATES))
        desired["run"] = run
    for name in INT_LIMITS:
        if params.get(name) is not None:
            desired[name] = params[name]
    for name in list(desired):
        if name in INT_LIMITS:
            desired[name] = _check_int(name, desired[name])
    for name in BOOL_SETTINGS:
        value = params.get(name)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise InvalidInput("%s=%r is not a boolean: allowed are true and false" % (name, value),
                               option=name, value=value, allowed=[True, False])
        desired[name] = value
    return desired


def sysfs_value(name, value):
    """What to write to the sysfs file ``name`` for the module value ``value``."""
    if name == "run":
        return str(RUN_STATES[value])
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def write_setting(directory, name, value):
    """Write one setting; the kernel's refusal becomes a HostError naming file and value."""
    path = os.path.join(directory, name)
    text = sysfs_value(name, value)
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as error:
        raise HostError("writing %s to %s failed: %s" % (text, path, error), path=path, value=text) from error


def persist_content(directory, desired):
    """The tmpfiles.d file that writes ``desired`` again at boot, in a safe order."""
    lines = ["# Managed by smallcloud.kvm.ksm: KSM settings written at boot by systemd-tmpfiles."]
    for name in SETTINGS:
        if name in desired:
            lines.append("w %s - - - - %s" % (os.path.join(directory, name), sysfs_value(name, desired[name])))
    return "\n".join(lines) + "\n"


def check_present(directory, raw, desired):
    """Fail, naming the file, when a wanted setting does not exist in this kernel."""
    for name in desired:
        if name not in raw:
            path = os.path.join(directory, name)
            raise HostError("this kernel has no KSM setting %s: %s does not exist" % (name, path),
                            option=name, path=path)


def plan_settings(directory, current, desired):
    """A Plan converging ``current`` (settings_view) to ``desired``."""
    plan = Plan()
    changes = [name for name in SETTINGS if name in desired and plan.compare(name, current[name], desired[name])]
    # After the unmerge dance run is "unmerge"; put back what was asked for, or what was there.
    final_run = desired.get("run", current["run"])
    if any(name in NEED_EMPTY for name in changes):
        # A write the kernel refuses after this step must not leave KSM stopped: undone to what run was.
        plan.add("unmerge every merged page (run=unmerge) so the kernel accepts %s"
                 % " and ".join(n for n in changes if n in NEED_EMPTY), write_setting, directory, "run", "unmerge",
                 ).undone_by(write_setting, directory, "run", current["run"])
    for name in changes:
        if name != "run":
            plan.add("set %s to %s" % (name, sysfs_value(name, desired[name])),
                     write_setting, directory, name, desired[name])
    if "run" in changes or any(name in NEED_EMPTY for name in changes):
        plan.add("set run to %s" % final_run, write_setting, directory, "run", final_run)
    return plan
