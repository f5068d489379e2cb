"""Fixtures of the e2e tier. Add yours below; keep each fixture's logic in a helper module."""

import fcntl
import os
import subprocess
from pathlib import Path

import pytest
from harness.host import virsh
from harness.ksm import LOCK, ksm_locked_and_restored
from tinyimage import build_debian_image, build_tiny_image

FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


@pytest.fixture(scope="session")
def tiny_image():
    """The tiny guest image (raw, qcow2, xz, SHA256SUMS in one directory), built once and cached
    in .cache/images/tiny across runs; rebuilt only when the build script or its inputs change.
    Serve it with ``http_server(tiny_image.directory)``; never write to its files (use an overlay)."""
    return build_tiny_image()


@pytest.fixture(scope="session")
def debian_image():
    """The Debian 12 cloud image (cloud and generic kernel variants, SHA256SUMS), built once and cached in
    .cache/images/debian-bookworm; for the tests that need real cloud-init, systemd and sshd."""
    return build_debian_image()


@pytest.fixture
def machine_as_found(libvirtd):
    """Deploying a hypervisor tunes KSM, turns IP forwarding on, gives /dev/kvm to group kvm and removes
    libvirt's default network; afterwards all of that is put back as this machine had it."""
    forward = FORWARD.read_text().strip()
    kvm = os.stat("/dev/kvm") if os.path.exists("/dev/kvm") else None
    default_net = virsh("net-dumpxml", "--inactive", "default")
    with ksm_locked_and_restored():
        yield
    subprocess.run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={forward}"], check=True)
    if kvm is not None:
        os.chown("/dev/kvm", kvm.st_uid, kvm.st_gid)
        os.chmod("/dev/kvm", kvm.st_mode & 0o7777)
    if default_net.returncode == 0 and virsh("net-info", "default").returncode != 0:
        subprocess.run(["virsh", "-c", "qemu:///system", "net-define", "/dev/stdin"], input=default_net.stdout,
                       text=True, capture_output=True, check=True)


@pytest.fixture
def ksm_lock():
    """Hold the KSM lock without restoring anything: for tests that check a playbook restores KSM itself."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
