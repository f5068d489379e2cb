"""The guest images for tests: build the tiny one (scripts/build-tiny-image), seed it, boot it under TCG;
build the Debian cloud image (scripts/build-debian-image) for the tests that need a real OS.

The demo calls the build scripts directly; this module is the test-side wrapper around them plus the
helpers every guest test needs: a NoCloud seed, a QEMU guest and its serial console.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-tiny-image"
DEBIAN_BUILD_SCRIPT = ROOT / "scripts" / "build-debian-image"
# Markers the guest prints on ttyS0, in this order (SMALLCLOUD-IP once per leased interface).
BOOT, SEED, HOSTNAME, IP, READY = (
    "SMALLCLOUD-BOOT", "SMALLCLOUD-SEED", "SMALLCLOUD-HOSTNAME", "SMALLCLOUD-IP", "SMALLCLOUD-READY")
# Under TCG on a busy 2-core machine the Debian kernel alone takes 10-30 s to decompress and boot.
BOOT_TIMEOUT = 180


@dataclass(frozen=True)
class TinyImage:
    """A built image set in one directory, ready for ``http_server(image.directory)``."""

    directory: Path

    @property
    def raw(self):
        return self.directory / "tiny.raw"

    @property
    def qcow2(self):
        return self.directory / "tiny.qcow2"

    @property
    def xz(self):
        return self.directory / "tiny.raw.xz"

    @property
    def sha256sums(self):
        return self.directory / "SHA256SUMS"

    @property
    def info(self):
        """What went in: packages, kernel version, modules, input digest (build-info.json)."""
        return json.loads((self.directory / "build-info.json").read_text())

    def checksums(self):
        """{file name: sha256 hex} from SHA256SUMS."""
        return read_sha256sums(self.sha256sums)


@dataclass(frozen=True)
class DebianImage:
    """The Debian cloud image set: one root file system booted by Debian's cloud kernel or its generic one."""

    directory: Path
    release: str = "bookworm"

    def name(self, kernel="cloud"):
        return f"debian-{self.release}.qcow2" if kernel == "cloud" else f"debian-{self.release}-{kernel}.qcow2"

    def checksums(self):
        """{file name: sha256 hex} from SHA256SUMS."""
        return read_sha256sums(self.directory / "SHA256SUMS")


def read_sha256sums(path):
    lines = Path(path).read_text().splitlines()
    return {name.lstrip("*"): digest for digest, name in (line.split(None, 1) for line in lines)}


def run_build(script, argv, timeout):
    """Run an image build script (a no-op when its inputs are unchanged); the output directory it printed."""
    result = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def build_tiny_image(output=None, force=False, timeout=900):
    """The tiny image set, built or found current."""
    return TinyImage(run_build(BUILD_SCRIPT, ([str(output)] if output else []) + (["--force"] if force else []),
                               timeout))


def build_debian_image(release="bookworm", timeout=1800):
    """The Debian cloud image set (about 3-5 minutes the first time, then cached in .cache/images)."""
    return DebianImage(run_build(DEBIAN_BUILD_SCRIPT, ["--release", release], timeout), release)


def make_seed(path, hostname, user_data=None, fs="iso9660", instance_id="iid-tiny"):
    """A cloud-init NoCloud seed (label cidata) with meta-data local-hostname; iso9660 or vfat."""
    path = Path(path)
    files = {"meta-data": f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n",
             "user-data": user_data if user_data is not None else "#cloud-config\n"}
    with tempfile.TemporaryDirectory() as scratch:
        for name, text in files.items():
            (Path(scratch) / name).write_text(text)
        sources = [str(Path(scratch) / name) for name in files]
        if fs == "iso9660":
            _run(["genisoimage", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock", *sources])
        elif fs == "vfat":
            # A 1.44 MB FAT12 floppy layout: mformat knows it by heart, no mkfs.vfat needed.
            path.write_bytes(b"")
            _run(["mformat", "-C", "-f", "1440", "-v", "cidata", "-i", str(path), "::"])
            _run(["mcopy", "-i", str(path), *sources, "::"])
        else:
            raise ValueError(f"seed fs must be iso9660 or vfat, not {fs!r}")
    return path


def overlay(backing, path):
    """A qcow2 overlay on the built image, so a guest never writes to the shared cache."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)])
    return Path(path)


def _run(argv):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


class Console:
    """A guest's serial console log file, read as it grows."""

    def __init__(self, path, alive=lambda: True):
        self.path = Path(path)
        self.alive = alive

    def text(self):
        try:
            return self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, marker):
        """Console lines starting with ``marker`` (markers may follow other output on one line)."""
        found = []
        for line in self.text().splitlines():
            index = line.find(marker)
            if index >= 0:
                found.append(line[index:].strip())
        return found

    def wait_for(self, marker, timeout=BOOT_TIMEOUT):
        """The first console line with ``marker``; fails with the console tail if it never comes."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines(marker)
            if found:
                return found[0]
            if not self.alive():
                raise AssertionError(f"guest stopped before {marker}; console:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker} on the console within {timeout} s; console:\n{self.text()[-3000:]}")
            time.sleep(0.2)


def user_net(http_port=None):
    """QEMU user networking (DHCP 10.0.2.15); ``http_port`` forwards 127.0.0.1:PORT to guest port 80."""
    return "user" + (f",hostfwd=tcp:127.0.0.1:{http_port}-:80" if http_port else "")


def tap_net(ifname):
    """An existing tap device (e.g. inside a test's network namespace)."""
    return f"tap,ifname={ifname},script=no,downscript=no"


class QemuGuest:
    """A TCG guest booted from ``disk`` (virtio), with an optional NoCloud seed and virtio NICs.

    ``seed_bus``: "ide" attaches the seed as an IDE cdrom (i440fx), "virtio" as a second virtio disk.
    ``nets``: QEMU -netdev specs (``user_net()``, ``tap_net()``), one virtio NIC each, eth0 first.
    ``netns``: run QEMU inside that network namespace (for its tap devices).
    """

    def __init__(self, workdir, disk, seed=None, seed_bus="ide", nets=(), netns=None):
        self.console = Console(Path(workdir) / "console.log", alive=lambda: self.process.poll() is None)
        argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-nodefaults",
                "-display", "none", "-monitor", "none", "-serial", f"file:{self.console.path}",
                "-drive", f"file={disk},if=virtio,format=qcow2"]
        if seed is not None:
            media = "cdrom" if seed_bus == "ide" else "disk"
            argv += ["-drive", f"file={seed},if={seed_bus},media={media},format=raw,readonly=on"]
        for index, net in enumerate(nets):
            # romfile= skips the iPXE option ROM: the guest boots from disk, the ROM only costs time.
            argv += ["-netdev", f"{net},id=net{index}", "-device", f"virtio-net-pci,netdev=net{index},romfile="]
        if not nets:
            argv += ["-nic", "none"]
        # `ip netns exec` execs QEMU in place, so the pid (and the session we kill) is QEMU's.
        self.argv = (["ip", "netns", "exec", netns] if netns else []) + argv
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self):
        """Kill QEMU (the guest has nothing to save) and reap it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


class LibvirtGuest:
    """A transient libvirt domain (type qemu) booting the image: virtio disk, seed on a SATA cdrom,
    serial console to a file, no network. Its files live in a world-readable scratch directory
    because QEMU under qemu:///system runs as libvirt-qemu and cannot enter pytest's 0700 tmp."""

    def __init__(self, uri, image, seed_builder, name):
        self.uri, self.name = uri, name
        self.directory = Path(tempfile.mkdtemp(prefix="smallcloud-tiny-"))
        self.directory.chmod(0o755)
        self.created = False
        self.console = Console(self.directory / "console.log", alive=self.running)
        try:
            # A full copy, not an overlay: libvirt relabels every file of the backing chain it
            # opens, and the cached image is shared with other tests.
            self.disk = self.directory / "disk.qcow2"
            shutil.copyfile(image.qcow2, self.disk)
            self.seed = seed_builder(self.directory / "seed.iso")
            xml = self.directory / "domain.xml"
            xml.write_text(self.domain_xml())
            _run(["virsh", "-c", uri, "create", str(xml)])
            self.created = True
        except BaseException:
            self.destroy()
            raise

    def domain_xml(self):
        return f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{self.disk}'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file='{self.seed}'/><target dev='sda' bus='scsi'/><readonly/>
    </disk>
    <serial type='file'><source path='{self.console.path}'/><target port='0'/></serial>
  </devices>
</domain>
"""

    def running(self):
        result = subprocess.run(["virsh", "-c", self.uri, "domstate", self.name],
                                capture_output=True, text=True, timeout=30, check=False)
        return result.returncode == 0 and result.stdout.strip() == "running"

    def destroy(self):
        """Destroy the domain (transient: that also undefines it) and remove its files."""
        try:
            if self.created:
                subprocess.run(["virsh", "-c", self.uri, "destroy", self.name],
                               capture_output=True, timeout=60, check=False)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
