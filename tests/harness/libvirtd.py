"""A running libvirtd: reuse the one that answers, else start virtlogd + libvirtd ourselves."""

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from harness.ports import wait_for

SYSTEM_URI = "qemu:///system"


def libvirt_answers(uri=SYSTEM_URI):
    result = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=20, check=False)
    return result.returncode == 0


def _daemon_running(pidfile):
    try:
        os.kill(int(Path(pidfile).read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


class Libvirtd:
    """Ensures libvirtd answers on qemu:///system; stop() ends only the daemons it started."""

    DAEMONS = (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid"))

    def __init__(self):
        self.started = []
        if libvirt_answers():
            return
        # Without systemd's socket activation libvirtd needs virtlogd running, or starting
        # a domain fails with "Failed to connect socket to '/run/libvirt/virtlogd-sock'".
        for daemon, pidfile in self.DAEMONS:
            if not _daemon_running(pidfile):
                subprocess.run([daemon, "-d"], check=True, timeout=30)
                self.started.append((daemon, pidfile))
        wait_for(libvirt_answers, 60, interval=0.5, what="libvirtd answering on qemu:///system")

    uri = SYSTEM_URI

    @property
    def restartable(self):
        """Whether this harness started libvirtd, so that restarting it interrupts nobody else's daemon."""
        return any(daemon == "libvirtd" for daemon, _pidfile in self.started)

    def restart(self):
        """Stop libvirtd (SIGTERM) and start it again, as an upgrade or a crash-and-restart would; running
        guests keep running (libvirtd finds their QEMU again). Only a daemon this harness started."""
        if not self.restartable:
            raise RuntimeError("libvirtd was not started by the tests; not restarting somebody else's daemon")
        pidfile = dict(self.DAEMONS)["libvirtd"]
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _pid_alive(pid), 30, interval=0.05, what="libvirtd exit")
        subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
        wait_for(libvirt_answers, 60, interval=0.2, what="libvirtd answering again on qemu:///system")

    def stop(self):
        for daemon, pidfile in reversed(self.started):
            try:
                pid = int(Path(pidfile).read_text().strip())
            except (OSError, ValueError):
                continue
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda pid=pid: not _pid_alive(pid), 30, what=f"{daemon} exit")
        self.started = []


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def kvm_device_for_qemu(path="/dev/kvm"):
    """/dev/kvm usable by libvirt-qemu (group kvm, 0660) as Debian's udev rule leaves it; put back afterwards.

    libvirt re-probes QEMU on every call while its cached capabilities say KVM but the device is not
    accessible to the QEMU user ("KVM was enabled when probing ... but it is not available now"),
    which makes each define take tens of seconds.
    """
    if not os.path.exists(path):
        yield
        return
    before = os.stat(path)
    changed = before.st_mode & 0o060 != 0o060
    if changed:
        shutil.chown(path, group="kvm")
        os.chmod(path, 0o660)
    try:
        yield
    finally:
        if changed:
            os.chown(path, before.st_uid, before.st_gid)
            os.chmod(path, before.st_mode & 0o7777)
