"""Build the tiny guest image from Debian packages, without installing a kernel on this host.

    scripts/build-tiny-image [OUTPUT_DIR] [--force]      (runs this file with python3)

The Debian kernel (linux-image-amd64's dependency) and busybox-static are fetched with
`apt-get download` into .cache/debs and unpacked into a scratch directory. The image is an
MBR disk (syslinux's mbr.bin) with one FAT partition, written with mtools and
`syslinux --install` (no loop mounts), holding the kernel and a busybox initramfs with the few
modules a virtio/IDE/SATA guest needs; the init is images/tiny/rcS.

OUTPUT_DIR (default .cache/images/tiny) receives tiny.raw, tiny.qcow2, tiny.raw.xz, SHA256SUMS
and build-info.json. When the inputs (this script, images/tiny/*, package versions) are unchanged
the build is skipped: only apt-cache is asked, so a cached run takes well under a second.
"""

import argparse
import fcntl
import gzip
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "images" / "tiny"
DEFAULT_OUTPUT = ROOT / ".cache" / "images" / "tiny"
DEB_CACHE = ROOT / ".cache" / "debs"
SOURCE_PACKAGES = ("linux-image-amd64", "busybox-static")
STAMP_FORMAT = 1  # bump to force a rebuild when the output layout changes

# Drivers the guest loads, in this order; their dependencies come first automatically.
# Anything built into the Debian kernel (=y) is skipped and listed in build-info.json.
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "e1000",  # not the NIC to use, but a domain without a <model> still gets an address
    "8139cp",  # libvirt's default NIC model (rtl8139) when none is given: QEMU emulates the C+ chip
    "virtio_scsi",
    "ata_piix",  # IDE cdrom/disk on the i440fx (pc) machine
    "ahci",  # SATA cdrom/disk on q35, or libvirt bus='sata'
    "sd_mod",
    "sr_mod",
    "isofs",
    "vfat",
    "nls_cp437",  # vfat's default codepage and iocharset: loaded up front, there is no udev
    "nls_ascii",
    "nls_utf8",
    "button",  # ACPI power button -> acpid -> poweroff (virsh shutdown)
    "evdev",
)

DISK_MIB = 32
PARTITION_START = 2048  # sectors: the usual 1 MiB alignment
SECTOR = 512
# CHS geometry recorded in the partition table; SeaBIOS and mbr.bin use LBA anyway.
HEADS, SECTORS_PER_TRACK = 64, 32
FAT_PARTITION_TYPE = 0x0E  # FAT16, LBA


def log(message):
    print(f"build-tiny-image: {message}", file=sys.stderr, flush=True)


def run(argv, **kwargs):
    """Run a tool; on failure show its output and stop."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        sys.exit(f"build-tiny-image: {' '.join(map(str, argv))} failed ({result.returncode}):\n"
                 f"{result.stdout}{result.stderr}")
    return result.stdout


# --- packages --------------------------------------------------------------------------------

def apt(tool, *args, **kwargs):
    """apt-cache/apt-get with a package cache of our own: this host's apt config disables the
    shared one, and rebuilding it costs about a second per call; with it a cached run is instant."""
    cache = ROOT / ".cache" / "apt"
    cache.mkdir(parents=True, exist_ok=True)
    options = ["-o", f"Dir::Cache::pkgcache={cache / 'pkgcache.bin'}",
               "-o", f"Dir::Cache::srcpkgcache={cache / 'srcpkgcache.bin'}"]
    return run([tool, *options, *args], **kwargs)


def candidates(packages):
    """{package: version apt would install, or None when the lists do not know it}."""
    found = dict.fromkeys(packages)
    for section in re.split(r"^(?=\S)", apt("apt-cache", "policy", *packages), flags=re.M):
        match = re.match(r"(\S+):\n(?:.*\n)*?\s*Candidate:\s*(\S+)", section)
        if match and match.group(1) in found and match.group(2) != "(none)":
            found[match.group(1)] = match.group(2)
    return found


def source_versions():
    """Versions of linux-image-amd64 and busybox-static, refreshing the apt lists if they lack one."""
    versions = candidates(SOURCE_PACKAGES)
    if None in versions.values():
        log("apt lists lack the packages; running apt-get update")
        run(["apt-get", "update", "-q"])
        versions = candidates(SOURCE_PACKAGES)
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        sys.exit(f"build-tiny-image: no candidate for {' '.join(missing)} even after apt-get update")
    return versions


def resolve_packages(versions):
    """[(name, version)] of the debs to unpack: the versioned kernel linux-image-amd64 depends on."""
    show = apt("apt-cache", "show", f"linux-image-amd64={versions['linux-image-amd64']}")
    match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,]*)\s*\(=\s*([^)\s]+)\)", show, re.M)
    if match is None:
        sys.exit(f"build-tiny-image: cannot find the versioned kernel in linux-image-amd64's Depends:\n{show}")
    return [(match.group(1), match.group(2)), ("busybox-static", versions["busybox-static"])]


def host_tool_versions():
    """syslinux's boot code ends up in the image, so its version is an input too."""
    out = run(["dpkg-query", "-W", "-f", "${Package}=${Version}\\n", "syslinux", "syslinux-common", "mtools"])
    return out.split()


def inputs_digest(versions):
    """Hash of everything the image is made from; the output is rebuilt when it changes."""
    digest = hashlib.sha256(f"format={STAMP_FORMAT}\n".encode())
    for path in [ROOT / "scripts" / "build-tiny-image", *sorted(SOURCES.iterdir())]:
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".pyc":
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for line in [f"{name}={version}" for name, version in sorted(versions.items())] + host_tool_versions():
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def deb_path(name, version):
    # apt-get download names files name_version_arch.deb with ':' (epochs) escaped as %3a.
    return DEB_CACHE / f"{name}_{version.replace(':', '%3a')}_amd64.deb"


def download(packages):
    """The .deb files, fetched once into .cache/debs."""
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    missing = [f"{name}={version}" for name, version in packages if not deb_path(name, version).exists()]
    if missing:
        log(f"downloading {' '.join(missing)}")
        # Root downloads into a root-owned directory; the _apt sandbox user could not write there.
        apt("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing, cwd=DEB_CACHE)
    return [deb_path(name, version) for name, version in packages]


# --- kernel modules --------------------------------------------------------------------------

def modinfo(path):
    """The key=value pairs of a module's .modinfo ELF section (depmod is not needed on the host)."""
    data = path.read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for name_index, _type, _flags, _addr, offset, size in headers:
        name_end = data.index(b"\0", names_offset + name_index)
        if data[names_offset + name_index:name_end] == b".modinfo":
            fields = [item.decode(errors="replace") for item in data[offset:offset + size].split(b"\0") if item]
            return [tuple(item.split("=", 1)) for item in fields if "=" in item]
    return []


class ModuleIndex(dict):
    """{name: (relative path, [dependencies], [aliases])}, read lazily from the .ko files asked for."""

    def __init__(self, module_root):
        super().__init__()
        self.root = module_root
        # Kernel module names treat '-' and '_' alike; file names and depends= keep either spelling.
        self.paths = {path.stem.replace("-", "_"): path for path in module_root.glob("kernel/**/*.ko")}

    def __contains__(self, name):
        return name in self.paths

    def __missing__(self, name):
        info = modinfo(self.paths[name])
        depends = next((value for key, value in info if key == "depends"), "")
        self[name] = (self.paths[name].relative_to(self.root).as_posix(),
                      [d.replace("-", "_") for d in depends.split(",") if d],
                      [value for key, value in info if key == "alias"])
        return self[name]


def builtin_modules(module_root):
    names = (module_root / "modules.builtin").read_text().split()
    return {Path(name).name.removesuffix(".ko").replace("-", "_") for name in names}


def module_closure(index, builtin):
    """Wanted modules plus dependencies, dependencies first; and the wanted ones built in."""
    ordered, built_in = [], []

    def visit(name, trail):
        if name in ordered:
            return
        if name in builtin:
            if name in MODULES:
                built_in.append(name)
            return
        if name not in index:
            sys.exit(f"build-tiny-image: module {name} (needed by {' <- '.join(trail) or 'the guest'}) "
                     "is neither in the kernel package nor built in")
        for dependency in index[name][1]:
            visit(dependency, [name, *trail])
        ordered.append(name)

    for name in MODULES:
        visit(name, [])
    return ordered, built_in


def dependencies(name, index):
    """Every module ``name`` needs, transitively, in load order (modules.dep lists them reversed)."""
    ordered = []

    def visit(module):
        for dependency in index[module][1]:
            if dependency in index and dependency not in ordered:
                visit(dependency)
                ordered.append(dependency)

    visit(name)
    return ordered


# --- initramfs -------------------------------------------------------------------------------

class Cpio:
    """A newc cpio archive built in memory, so device nodes need no mknod and owners are root."""

    def __init__(self):
        self.chunks, self.inode = [], 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_bytes = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0)
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        # newc pads the header+name and the data each to a multiple of 4 bytes.
        padding = b"\0" * (-(len(header) + len(name_bytes)) % 4)
        self.chunks += [header, name_bytes, padding, data, b"\0" * (-len(data) % 4)]

    def directory(self, name):
        self._entry(name, 0o040755)

    def file(self, name, data, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name, target):
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def gzipped(self):
        self._entry("TRAILER!!!", 0)
        return gzip.compress(b"".join(self.chunks), compresslevel=9, mtime=0)


def parent_dirs(paths):
    dirs = set()
    for path in paths:
        parts = Path(path).parts[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(dirs)


def busybox_applets(busybox):
    """Applet paths (bin/sh, sbin/udhcpc, ...) of the downloaded busybox, asked from the binary."""
    applets = run([str(busybox), "--list-full"]).split()
    return [path for path in applets if path not in ("bin/busybox", "init", "linuxrc")]


def build_initramfs(busybox, module_root, modules, index):
    """gzip'd cpio: busybox init, rcS, udhcpc hook, acpid handler and the modules with a modules.dep."""
    version = module_root.name
    kernel_dir = f"lib/modules/{version}"
    files = {
        "bin/busybox": (busybox.read_bytes(), 0o755),
        "etc/inittab": ((SOURCES / "inittab").read_bytes(), 0o644),
        "etc/init.d/rcS": ((SOURCES / "rcS").read_bytes(), 0o755),
        "etc/udhcpc.script": ((SOURCES / "udhcpc.script").read_bytes(), 0o755),
        "etc/acpi/PWRF/00000080": ((SOURCES / "acpi-power-button").read_bytes(), 0o755),
        "etc/smallcloud/modules": ("".join(f"{name}\n" for name in MODULES if name in modules).encode(), 0o644),
        "etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        "etc/group": (b"root:x:0:\n", 0o644),
    }
    for name in modules:
        files[f"{kernel_dir}/{index[name][0]}"] = ((module_root / index[name][0]).read_bytes(), 0o644)
    # busybox modprobe resolves dependencies and aliases (kernel request_module) from these two.
    files[f"{kernel_dir}/modules.dep"] = ("".join(
        f"{index[name][0]}: {' '.join(index[dep][0] for dep in reversed(dependencies(name, index)))}\n"
        for name in modules).encode(), 0o644)
    files[f"{kernel_dir}/modules.alias"] = ("".join(
        f"alias {alias} {name}\n" for name in modules for alias in index[name][2]).encode(), 0o644)
    links = dict.fromkeys(busybox_applets(busybox), "/bin/busybox")
    links["init"] = "/bin/busybox"
    archive = Cpio()
    empty_dirs = ["dev", "proc", "sys", "tmp", "run", "mnt", "root", "www", "var/log", "usr/bin", "usr/sbin"]
    for directory in sorted(set(parent_dirs([*files, *links]) + parent_dirs([d + "/x" for d in empty_dirs]))):
        archive.directory(directory)
    # The kernel opens /dev/console before /init runs, before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1)
    for path, (data, mode) in sorted(files.items()):
        archive.file(path, data, mode)
    for path, target in sorted(links.items()):
        archive.symlink(path, target)
    return archive.gzipped()


# --- disk ------------------------------------------------------------------------------------

def chs(lba):
    cylinder, rest = divmod(lba, HEADS * SECTORS_PER_TRACK)
    head, sector = divmod(rest, SECTORS_PER_TRACK)
    cylinder = min(cylinder, 1023)
    return bytes([head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF])


def master_boot_record(total_sectors, disk_signature):
    """syslinux's mbr.bin plus a partition table with one active FAT partition."""
    boot_code = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()[:440]
    count = total_sectors - PARTITION_START
    entry = (b"\x80" + chs(PARTITION_START) + bytes([FAT_PARTITION_TYPE]) + chs(total_sectors - 1)
             + struct.pack("<II", PARTITION_START, count))
    return boot_code.ljust(440, b"\0") + struct.pack("<I", disk_signature) + b"\0\0" + entry + b"\0" * 48 + b"\x55\xaa"


def build_fat(path, sectors, files):
    """A FAT filesystem image with syslinux installed; mtools only, so no loop device or root mount."""
    with open(path, "wb") as image:
        image.truncate(sectors * SECTOR)
    # -H: hidden sectors = the partition's offset, which the FAT boot sector uses to find itself.
    run(["mformat", "-i", str(path), "-T", str(sectors), "-h", str(HEADS), "-s", str(SECTORS_PER_TRACK),
         "-H", str(PARTITION_START), "-v", "SMALLCLOUD", "::"])
    run(["syslinux", "--install", str(path)])
    for name, source in files.items():
        run(["mcopy", "-i", str(path), "-m", str(source), f"::{name}"])


def build_disk(raw, work, kernel, initrd, digest):
    total_sectors = DISK_MIB * 1024 * 1024 // SECTOR
    fat = work / "fat.img"
    build_fat(fat, total_sectors - PARTITION_START,
              {"syslinux.cfg": SOURCES / "syslinux.cfg", "vmlinuz": kernel, "initrd.gz": initrd})
    with open(raw, "wb") as disk:
        disk.write(master_boot_record(total_sectors, int(digest[:8], 16)))
        disk.seek(PARTITION_START * SECTOR)
        with open(fat, "rb") as source:
            shutil.copyfileobj(source, disk, 1 << 20)
        disk.truncate(total_sectors * SECTOR)


# --- outputs ---------------------------------------------------------------------------------

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_outputs(stage, raw):
    """qcow2 and xz beside the raw disk, and SHA256SUMS over the three."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(stage / "tiny.qcow2")])
    # -0: the disk is mostly the kernel's own xz payload; higher levels cost CPU and save under 0.1 %.
    run(["xz", "-k", "-T2", "-0", str(raw)])
    names = ["tiny.raw", "tiny.qcow2", "tiny.raw.xz"]
    (stage / "SHA256SUMS").write_text("".join(f"{sha256(stage / name)}  {name}\n" for name in names))


def is_current(output, digest):
    try:
        info = json.loads((output / "build-info.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = ["tiny.raw", "tiny.qcow2", "tiny.raw.xz", "SHA256SUMS"]
    return info.get("inputs") == digest and all((output / name).is_file() for name in wanted)


def publish(stage, output):
    """Swap the finished directory into place, so readers never see half an image set."""
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        stage.rename(output)
        shutil.rmtree(old)
    else:
        stage.rename(output)


def build(output, versions, digest):
    packages = resolve_packages(versions)
    kernel_deb, busybox_deb = download(packages)
    with tempfile.TemporaryDirectory(prefix=".tiny-build-", dir=output.parent) as scratch:
        work = Path(scratch)
        log(f"unpacking {kernel_deb.name} and {busybox_deb.name}")
        run(["dpkg-deb", "-x", str(kernel_deb), str(work / "kernel")])
        run(["dpkg-deb", "-x", str(busybox_deb), str(work / "busybox")])
        module_root = next((work / "kernel" / "lib" / "modules").iterdir())
        index = ModuleIndex(module_root)
        modules, built_in = module_closure(index, builtin_modules(module_root))
        log(f"kernel {module_root.name}; modules: {' '.join(modules)}; built in: {' '.join(built_in) or '-'}")
        initrd = work / "initrd.gz"
        initrd.write_bytes(build_initramfs(work / "busybox" / "bin" / "busybox", module_root, modules, index))
        stage = work / "out"
        stage.mkdir()
        build_disk(stage / "tiny.raw", work, next((work / "kernel" / "boot").glob("vmlinuz-*")), initrd, digest)
        write_outputs(stage, stage / "tiny.raw")
        info = {"inputs": digest, "packages": dict(packages), "kernel": module_root.name,
                "modules": modules, "built_in": built_in, "disk_mib": DISK_MIB,
                "initrd_bytes": initrd.stat().st_size}
        (stage / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        publish(stage, output)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="build-tiny-image", description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    # One builder per output directory: parallel test sessions wait, then find the image current.
    with open(output.parent / f".{output.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        versions = source_versions()
        digest = inputs_digest(versions)
        if not args.force and is_current(output, digest):
            log(f"{output} is up to date")
        else:
            build(output, versions, digest)
            log(f"built {output}")
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
