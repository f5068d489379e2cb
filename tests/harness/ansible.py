"""Drive modules and playbooks through real ansible-playbook and return the JSON results."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.paths import ROOT
VENV_BIN = Path(sys.executable).parent
# The managed host's own Python, with Debian's libvirt, pyroute2 and etcd3gw: what a hypervisor has.
MANAGED_PYTHON = "/usr/bin/python3"


def ansible_env(extra=None):
    """Environment for ansible-*: this checkout as the collection, JSON results on stdout."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".cache" / "collections"),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_DEPRECATION_WARNINGS="False",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    env.update(extra or {})
    return env


@dataclass
class PlaybookRun:
    """What one ansible-playbook run returned."""

    rc: int
    stdout: str
    stderr: str
    report: dict = field(default_factory=dict)

    @property
    def tasks(self):
        """Every task result in order: dicts with 'task' (name) and 'hosts' (host -> result)."""
        return [task for play in self.report.get("plays", []) for task in play.get("tasks", [])]

    def results(self, host="localhost"):
        """Per-task results for ``host``, named, in order."""
        out = []
        for task in self.tasks:
            if host in task["hosts"]:
                result = dict(task["hosts"][host])
                result["_task"] = task["task"]["name"]
                out.append(result)
        return out

    @property
    def stats(self):
        return self.report.get("stats", {})

    def failures(self):
        """(task name without its ``role : `` prefix, host, message) of every failed or unreachable result,
        one per failed loop item."""
        found = []
        for task in self.tasks:
            for host, result in task["hosts"].items():
                if not (result.get("failed") or result.get("unreachable")):
                    continue
                items = [item for item in result.get("results", []) if item.get("failed")]
                found += [(task_name(task), host, item.get("msg", "")) for item in items or [result]]
        return found

    def changed_count(self):
        return sum(host.get("changed", 0) for host in self.stats.values())

    def failed_count(self):
        return sum(host.get("failures", 0) + host.get("unreachable", 0) for host in self.stats.values())


def task_name(task):
    """A task's own name, without the ``role : `` prefix the callback adds."""
    return task["task"]["name"].split(" : ")[-1]


def local_inventory(directory):
    path = Path(directory) / "inventory.ini"
    path.write_text(f"localhost ansible_connection=local ansible_python_interpreter={MANAGED_PYTHON}\n")
    return path


def run_playbook(playbook, inventory=None, extra_vars=None, check=False, diff=False, args=(), env=None, timeout=900):
    """Run ``ansible-playbook`` on ``playbook`` (a path or a FQCN) and parse the JSON callback output."""
    with tempfile.TemporaryDirectory(prefix="sct-ansible-") as tmp:
        argv = [str(VENV_BIN / "ansible-playbook"), str(playbook), "-i", str(inventory or local_inventory(tmp))]
        if extra_vars:
            extra_path = Path(tmp) / "extra_vars.json"
            extra_path.write_text(json.dumps(extra_vars))
            argv += ["-e", f"@{extra_path}"]
        argv += (["--check"] if check else []) + (["--diff"] if diff else []) + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, env=ansible_env(env), timeout=timeout, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr, report)


def run_tasks(tasks, hosts="localhost", gather_facts=False, **kwargs):
    """Run a list of task dicts as one play; returns the PlaybookRun."""
    play = [{"name": "smallcloud test", "hosts": hosts, "gather_facts": gather_facts, "tasks": tasks}]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="sct-play-", delete=False) as handle:
        json.dump(play, handle)
    try:
        return run_playbook(handle.name, **kwargs)
    finally:
        os.unlink(handle.name)


def run_module(module, module_args=None, check=False, diff=False, env=None, **kwargs):
    """Run one module through ansible-playbook; return its result dict for localhost.

    ``module`` without a dot is taken as smallcloud.kvm.MODULE. The result carries ``failed``
    and ``msg`` when the module failed; ``changed``, ``diff`` and the module's own keys otherwise.
    """
    name = module if "." in module else f"smallcloud.kvm.{module}"
    task = {"name": f"run {name}", name: module_args or {}}
    run = run_tasks([task], check=check, diff=diff, env=env, **kwargs)
    results = run.results()
    if not results:
        output = f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        raise AssertionError(f"ansible-playbook gave no result (rc={run.rc}):\n{output}")
    return results[-1]
