"""Each module's import start-up on the managed host's Python, against the floor of ``ansible.module_utils.basic``.

For every module in plugins/modules, a fresh interpreter runs
``python -X importtime -c 'import ansible_collections.smallcloud.kvm.plugins.modules.NAME'`` and the bench reads
the cumulative import time of that import from ``-X importtime``; the floor is the same for
``import ansible.module_utils.basic`` alone (what every module pays). A library the collection imports only when
a run needs it counts too when every run of that module needs it: after the import, the same interpreter makes
the etcd client importable as the first EtcdGateway does (``etcd_gateway.load_etcd3gw``), so deferring etcd3gw
shows no gain for a module that always reaches etcd. Reported per module, median of the runs:
  start-up ms    cumulative import time of the module file (its imports included) + the deferred etcd3gw
  etcd3gw ms     of which the deferred etcd3gw import (0: not used, or already imported by the module file)
  x floor        start-up ms / floor ms (each run against the floor run of the same round)
  over floor     start-up ms minus what ``ansible.module_utils.basic`` took inside that same run: the module's
                 own start-up, steadier than the ratio on a busy machine
  process ms     wall time of the whole interpreter run (start-up, site, the imports, exit)
  contributors   the biggest packages imported beyond basic, inclusive (etcd3gw counts pbr inside it, too)

Two payload layouts, both as AnsiballZ lays them out (``ansible/__init__.py`` a stub, this checkout's
collection as ``ansible_collections.smallcloud.kvm`` from .cache/collections):
  files   plain directories: byte code cached in __pycache__, like ``python -X importtime`` by hand
  zip     one zip on sys.path, as the AnsiballZ payload a task runs: zipimport compiles every source each run

    .venv/bin/python bench/module_startup.py                    # 7 runs, both layouts (~1-2 min)
    .venv/bin/python bench/module_startup.py --runs 3 --payload files
    .venv/bin/python bench/module_startup.py --modules instance network
    .venv/bin/python bench/module_startup.py --collection DIR   # another tree, e.g. `git archive HEAD` unpacked
    .venv/bin/python bench/module_startup.py --json
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT / ".cache" / "collections"  # scripts/env.sh: ANSIBLE_COLLECTIONS_PATH, kvm -> this checkout
MANAGED_PYTHON = "/usr/bin/python3"  # tests/harness/ansible.py: the interpreter modules run under
FLOOR = "ansible.module_utils.basic"
FLOOR_NAMES = ("ansible", "ansible.module_utils", FLOOR)
MODULE_PREFIX = "ansible_collections.smallcloud.kvm.plugins.modules."
OWN_PREFIX = "ansible_collections"
# Shown in the JSON for every module even when 0, so runs can be compared package by package.
WATCHED = ("etcd3gw", "pbr", "pkg_resources", "importlib_metadata", "requests", "urllib3", "libvirt", "pyroute2",
           "lxml", "yaml")
# AnsiballZ's stubs (ansible/executor/module_common.py): the controller's ansible/__init__.py never reaches a host.
ANSIBLE_STUB = b"from pkgutil import extend_path\n__path__=extend_path(__path__,__name__)\n"
MARK = "@@smallcloud-bench-start"
DEFERRED_MARK = "@@smallcloud-bench-deferred"
GATEWAY = "ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway"
# The import, then what a run that reaches etcd imports at its first EtcdGateway (etcd3gw, deferred since the
# import does not need it): both are start-up a task pays, so both are counted.
RUN_CODE = """import sys
sys.stderr.write(%(start)r); sys.stderr.flush()
import %(target)s
sys.stderr.write(%(deferred)r); sys.stderr.flush()
gateway = sys.modules.get(%(gateway)r)
if gateway is not None and hasattr(gateway, "load_etcd3gw"):
    gateway.load_etcd3gw()
"""
LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


class Node:
    """One line of ``-X importtime``: a module, its own and cumulative microseconds, and what it imported."""

    def __init__(self, name, self_us, cumulative_us, children):
        self.name, self.self_us, self.cumulative_us, self.children = name, self_us, cumulative_us, children

    @property
    def root(self):
        return self.name.split(".", 1)[0]


def parse_importtime(stderr):
    """The import trees logged after MARK (the interpreter's own start-up is left out), as top-level Nodes."""
    pending = {}
    started = False
    for line in stderr.splitlines():
        if line.startswith(MARK):
            started = True
            continue
        found = LINE.match(line)
        if not started or not found:
            continue
        self_us, cumulative_us, indent, name = found.groups()
        depth = (len(indent) - 1) // 2
        # -X importtime logs a module after everything it imported, one level deeper.
        node = Node(name, int(self_us), int(cumulative_us), pending.pop(depth + 1, []))
        pending.setdefault(depth, []).append(node)
    return pending.get(0, [])


def attribute(roots):
    """Microseconds of the whole import, of the floor inside it, and per top-level package beyond the floor.

    A package's figure is inclusive (what it imported counts too) and taken at its outermost import, so etcd3gw
    includes pbr, which includes pkg_resources; every node inside the floor's own imports is left to the floor.
    """
    total = sum(node.cumulative_us for node in roots)
    floor = 0
    packages = {}
    own_self = 0

    def walk(node, outer_roots):
        nonlocal floor, own_self
        if node.name in FLOOR_NAMES:
            floor += node.cumulative_us
            return
        if node.root == OWN_PREFIX:
            own_self += node.self_us
        elif node.root not in outer_roots:
            packages[node.root] = packages.get(node.root, 0) + node.cumulative_us
        for child in node.children:
            walk(child, outer_roots | {node.root})

    for node in roots:
        walk(node, frozenset())
    return {"total_us": total, "floor_us": floor, "own_us": own_self, "packages": packages}


def payload_files(work, collection):
    """A directory laid out like an exploded AnsiballZ payload: stub ansible/, links to module_utils and collection."""
    base = Path(work) / "files"
    (base / "ansible").mkdir(parents=True)
    (base / "ansible" / "__init__.py").write_bytes(ANSIBLE_STUB)
    (base / "ansible" / "module_utils").symlink_to(ansible_module_utils())
    (base / "ansible_collections" / "smallcloud").mkdir(parents=True)
    (base / "ansible_collections" / "smallcloud" / "kvm").symlink_to(collection)
    return str(base)


def payload_zip(work, collection):
    """One zip with ansible.module_utils and the collection's modules and module_utils, as AnsiballZ ships them."""
    path = Path(work) / "payload.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ansible/__init__.py", ANSIBLE_STUB)
        archive.writestr("ansible/module_utils/__init__.py", ANSIBLE_STUB)
        utils = Path(ansible_module_utils())
        for source in sorted(utils.rglob("*.py")):
            relative = source.relative_to(utils)
            if relative != Path("__init__.py"):
                archive.write(source, "ansible/module_utils/%s" % relative)
        for package in ("ansible_collections", "ansible_collections/smallcloud", "ansible_collections/smallcloud/kvm",
                        "ansible_collections/smallcloud/kvm/plugins"):
            archive.writestr(package + "/__init__.py", b"")
        for part in ("modules", "module_utils"):
            top = collection / "plugins" / part
            if not (top / "__init__.py").exists():
                archive.writestr("ansible_collections/smallcloud/kvm/plugins/%s/__init__.py" % part, b"")
            for source in sorted(top.rglob("*.py")):
                archive.write(source, "ansible_collections/smallcloud/kvm/plugins/%s/%s"
                              % (part, source.relative_to(top)))
    return str(path)


def ansible_module_utils():
    """The ansible/module_utils directory of the ansible-core that runs the playbooks (this venv's)."""
    import ansible.module_utils  # noqa: PLC0415 - only its path is wanted

    return os.path.dirname(os.path.abspath(ansible.module_utils.__file__))


def clean_env(pythonpath):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = pythonpath
    env["ANSIBLE_COLLECTIONS_PATH"] = str(COLLECTIONS)
    return env


class ImportFailed(Exception):
    """The import raised; the message is the traceback's last line."""


def one_import(python, pythonpath, target):
    """Attribution of one ``import target`` in a fresh interpreter, plus its process wall time."""
    code = RUN_CODE % {"start": MARK + "\n", "deferred": DEFERRED_MARK + "\n", "target": target, "gateway": GATEWAY}
    started = time.perf_counter()
    run = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         env=clean_env(pythonpath), cwd="/", timeout=120, check=False)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("import time:")]
        raise ImportFailed(lines[-1] if lines else "exit status %d" % run.returncode)
    imported, _mark, deferred = run.stderr.partition(DEFERRED_MARK)
    result = attribute(parse_importtime(imported) + parse_importtime(MARK + "\n" + deferred))
    result["deferred_us"] = sum(node.cumulative_us for node in parse_importtime(MARK + "\n" + deferred))
    result["process_us"] = int(wall * 1e6)
    return result


def median_of(samples):
    """The median of each figure over the runs (a package missing from a run counts 0 there)."""
    names = set()
    for sample in samples:
        names.update(sample["packages"])
    packages = {name: statistics.median(sample["packages"].get(name, 0) for sample in samples) for name in names}
    keys = ("total_us", "floor_us", "own_us", "deferred_us", "process_us")
    figures = {key: statistics.median(sample[key] for sample in samples) for key in keys}
    figures["packages"] = packages
    figures["all_total_us"] = [sample["total_us"] for sample in samples]
    return figures


def measure(python, pythonpath, modules, runs):
    """Median figures of the floor and of every module; runs interleave the targets so noise spreads evenly."""
    targets = [FLOOR] + [MODULE_PREFIX + name for name in modules]
    failed = {}
    for target in targets:  # warm the page cache and (files) write byte code once, untimed
        try:
            one_import(python, pythonpath, target)
        except ImportFailed as error:
            failed[target] = str(error)
    if FLOOR in failed:
        raise SystemExit("%s cannot import %s: %s" % (python, FLOOR, failed[FLOOR]))
    targets = [target for target in targets if target not in failed]
    samples = {target: [] for target in targets}
    for _run in range(runs):
        for target in targets:
            samples[target].append(one_import(python, pythonpath, target))
    floor = median_of(samples[FLOOR])
    report = {"floor": floor, "modules": {}, "failed": {}}
    for name in modules:
        if MODULE_PREFIX + name in failed:
            report["failed"][name] = failed[MODULE_PREFIX + name]
            continue
        module_samples = samples[MODULE_PREFIX + name]
        figures = median_of(module_samples)
        figures["over_floor_us"] = statistics.median(sample["total_us"] - sample["floor_us"]
                                                     for sample in module_samples)
        # Each run's module against the floor measured just before it, in the same round: drift cancels.
        figures["ratio"] = round(statistics.median(sample["total_us"] / base["total_us"]
                                                   for sample, base in zip(module_samples, samples[FLOOR])), 2)
        figures["watched"] = {package: figures["packages"].get(package, 0) for package in WATCHED}
        report["modules"][name] = figures
    return report


def print_table(payload, report, top):
    floor = report["floor"]
    print("%s payload: floor `import %s` %.1f ms, %.0f ms process"
          % (payload, FLOOR, floor["total_us"] / 1e3, floor["process_us"] / 1e3))
    columns = ("module", "start-up ms", "etcd3gw ms", "x floor", "over floor", "process ms",
               "contributors beyond basic, inclusive ms")
    print("  %-12s %11s %10s %8s %10s %10s  %s" % columns)
    for name, figures in sorted(report["modules"].items(), key=lambda item: -item[1]["total_us"]):
        biggest = sorted(figures["packages"].items(), key=lambda item: -item[1])[:top]
        listing = ", ".join("%s %.1f" % (package, us / 1e3) for package, us in biggest if us >= 500)
        print("  %-12s %11.1f %10.1f %8.2f %10.1f %10.0f  %s" % (
            name, figures["total_us"] / 1e3, figures["deferred_us"] / 1e3, figures["ratio"],
            figures["over_floor_us"] / 1e3, figures["process_us"] / 1e3, listing or "-"))
    for name, error in sorted(report["failed"].items()):
        print("  %-12s import failed: %s" % (name, error))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per module and layout (median)")
    parser.add_argument("--python", default=MANAGED_PYTHON, help="interpreter (default: the managed host's)")
    parser.add_argument("--modules", nargs="*", help="module names (default: every module in plugins/modules)")
    parser.add_argument("--payload", choices=("files", "zip", "both"), default="both")
    parser.add_argument("--collection", type=Path, default=COLLECTIONS / "ansible_collections" / "smallcloud" / "kvm",
                        help="the collection's root (default: .cache/collections' link to this checkout); "
                             "e.g. a `git archive` of another commit, to compare")
    parser.add_argument("--top", type=int, default=6, help="contributors listed per module")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    collection = args.collection.resolve()
    if not (collection / "plugins" / "modules").is_dir():
        parser.error("%s has no plugins/modules (run scripts/bootstrap for .cache/collections)" % collection)
    modules = args.modules or sorted(path.stem for path in (collection / "plugins" / "modules").glob("*.py")
                                     if path.stem != "__init__")
    layouts = ("files", "zip") if args.payload == "both" else (args.payload,)
    work = tempfile.mkdtemp(prefix="sct-startup-")
    try:
        builders = {"files": payload_files, "zip": payload_zip}
        report = {"python": args.python, "runs": args.runs, "collection": str(collection)}
        for layout in layouts:
            report[layout] = measure(args.python, builders[layout](work, collection), modules, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = any(report[layout]["failed"] for layout in layouts)
    if args.json:
        print(json.dumps(report))
        return 1 if failed else 0
    print("module import start-up under %s, median of %d runs (-X importtime; process = whole interpreter run)"
          % (args.python, args.runs))
    for layout in layouts:
        print_table(layout, report[layout], args.top)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
