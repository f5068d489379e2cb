"""A cloud on the lab (`smallcloud lab`): its inventory, the public playbooks run against it with the test's
data, the lab hosts' private files, the cloud's etcd as h1's own client certificate reads it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.ansible import ansible_env
from test_lab import ssh

# The lab's underlay addresses (up to three hosts in these tests).
HOSTS = {"h1": "10.250.0.11", "h2": "10.250.0.12", "h3": "10.250.0.13"}


class LabCloud:
    """The lab, its inventory and the cloud's data (``self.data``, set by a subclass); playbooks run against it."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.inventory = self.dir / "inventory.ini"
        self.data = {}
        self.killed_runs = 0

    def playbook(self, ansible, name, extra=None, inventory=None, args=()):
        return ansible.run_playbook("smallcloud.kvm." + name, inventory=inventory or self.inventory,
                                    extra_vars={**self.data, **(extra or {})}, args=args, timeout=1800)

    def killed_playbook(self, name, extra, until, timeout=600, jitter=0.0):
        """Run public playbook ``name`` and kill it (SIGKILL, every process it started) once ``until()`` is true,
        ``jitter`` seconds later; True when it was killed, False when it ended first."""
        extra_path = self.dir / ("killed-%s.json" % name)
        extra_path.write_text(json.dumps({**self.data, **(extra or {})}))
        # The output stays beside the lab (which `lab down` removes): pytest keeps its tmp directories.
        self.killed_runs += 1
        log = self.dir.parent / ("killed-%s-%d.log" % (name, self.killed_runs))
        with open(log, "w") as output:
            run = subprocess.Popen(  # noqa: S603 - argv list
                [str(Path(sys.executable).parent / "ansible-playbook"), "smallcloud.kvm." + name, "-i",
                 str(self.inventory), "-e", "@%s" % extra_path], stdout=output, stderr=subprocess.STDOUT,
                env=dict(ansible_env(), ANSIBLE_STDOUT_CALLBACK="default"), start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while run.poll() is None and time.monotonic() < deadline:
                if until():
                    time.sleep(jitter)
                    os.killpg(run.pid, signal.SIGKILL)
                    return True
                time.sleep(0.2)
            return False
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    def host_path(self, host, path):
        """Where a lab host's private ``path`` lives on this machine."""
        top = next(p for p in ("/var/lib/smallcloud", "/etc/smallcloud") if path.startswith(p))
        return self.dir / host / top.strip("/").replace("/", "_") / Path(path).relative_to(top)

    def console(self, host, name):
        path = self.host_path(host, "/var/lib/smallcloud/instances/%s/console.log" % name)
        return path.read_text(errors="replace") if path.exists() else ""

    def store(self):
        """The cloud's records, read with h1's own client settings (its certificate, the cluster's CA)."""
        from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

        client = json.loads(self.host_path("h1", "/etc/smallcloud/etcd-client.json").read_text())
        return Store.from_params({
            "etcd_endpoints": client["endpoints"], "etcd_ca_cert": str(self.host_path("h1", client["ca_cert"])),
            "etcd_cert": str(self.host_path("h1", client["cert"])),
            "etcd_key": str(self.host_path("h1", client["key"])),
        }), client

    def ssh(self, host, command):
        return ssh(self.dir, HOSTS[host], command)

    @staticmethod
    def stop_sshd(host):
        """Every sshd of the host, its listener and the sessions Ansible's ControlPersist keeps open."""
        pids = subprocess.run(["ip", "netns", "pids", "sclab-" + host], capture_output=True, text=True,
                              check=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                if Path("/proc/%s/comm" % pid).read_text().strip() == "sshd":
                    subprocess.run(["kill", pid], check=False)
