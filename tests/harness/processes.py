"""Killing a process with everything it started, as ``kill -9`` of a whole run would.

A process group is not enough for ansible-playbook: since ansible-core 2.17 each worker calls setsid(), so the
modules a run executes live in sessions of their own and survive a killpg() of the run.
"""

import os
import signal
from pathlib import Path

from harness.ports import wait_for


def _parents():
    """``{pid: parent pid}`` of every process, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid):
    """Every process below ``pid`` in the process tree."""
    children = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid):
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def kill_tree(pid, timeout=10):
    """SIGKILL ``pid`` and every process it started; return once all of them are gone.

    The tree is stopped first (SIGSTOP), again until no new process shows up, so that nothing forks a child
    that would escape the kill; a killed parent's children are re-parented, so the whole tree is collected
    before any process of it dies. Daemons that detached earlier (dnsmasq) are not part of it, as with kill -9.
    """
    tree = [pid]
    _signal(pid, signal.SIGSTOP)
    while True:
        new = [child for child in descendants(pid) if child not in tree]
        if not new:
            break
        for child in new:
            _signal(child, signal.SIGSTOP)
        tree += new
    for member in tree:
        _signal(member, signal.SIGKILL)
    wait_for(lambda: not any(alive(member) for member in tree), timeout, interval=0.02,
             what="every process of the killed tree of %d gone" % pid)
    return tree
