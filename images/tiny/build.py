"""Build the tiny guest image from Debian packages, without installing a kernel on this host.

    scripts/build-tiny-image [OUTPUT_DIR] [--force]      (runs this file with python3)

The Debian kernel (linux-image-amd64's dependency) and busybox-static are fetched with
`apt-get download` into .cache/debs and unpacked into a scratch directory. The image is an
MBR disk (syslinux's mbr.bin) with one FAT partition, written with mtools and
`syslinux --install` (no loop mounts), holding the kernel and a busybox initramfs with the few
modules a virtio/IDE/SATA guest needs; the init is images/tiny/rcS.

OUTPUT_DIR (default .cache/images/tiny) receives tiny.raw, tiny.qcow2, tiny.raw.xz, SHA256SUMS
and build-info.json. When the inputs (images/tiny/*, images/diskimage.py, package versions) are
unchanged the build is skipped: only apt-cache is asked, so a cached run takes well under a second.
"""

import gzip
import re
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # images/: run as a script, not a package
from diskimage import (  # noqa: E402
    FAT16_LBA, PARTITION_START, ROOT, SECTOR, BuildError, ImageBuilder, Partition, build_fat,
    host_tool_versions, inputs_digest, log, main, run, source_files, write_disk, write_sha256sums)

SOURCES = ROOT / "images" / "tiny"
DEFAULT_OUTPUT = ROOT / ".cache" / "images" / "tiny"
DEB_CACHE = ROOT / ".cache" / "debs"
SOURCE_PACKAGES = ("linux-image-amd64", "busybox-static")

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
OUTPUTS = ("tiny.raw", "tiny.qcow2", "tiny.raw.xz")


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
        raise BuildError(f"no candidate for {' '.join(missing)} even after apt-get update")
    return versions


def resolve_packages(versions):
    """[(name, version)] of the debs to unpack: the versioned kernel linux-image-amd64 depends on."""
    show = apt("apt-cache", "show", f"linux-image-amd64={versions['linux-image-amd64']}")
    match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,]*)\s*\(=\s*([^)\s]+)\)", show, re.M)
    if match is None:
        raise BuildError(f"cannot find the versioned kernel in linux-image-amd64's Depends:\n{show}")
    return [(match.group(1), match.group(2)), ("busybox-static", versions["busybox-static"])]


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
            raise BuildError(f"module {name} (needed by {' <- '.join(trail) or 'the guest'}) "
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


# --- disk and outputs ------------------------------------------------------------------------

def build_disk(raw, work, kernel, initrd, digest):
    """An MBR disk with one bootable FAT partition holding syslinux, the kernel and the initramfs."""
    total_sectors = DISK_MIB * 1024 * 1024 // SECTOR
    fat = Partition(work / "fat.img", PARTITION_START, total_sectors - PARTITION_START, FAT16_LBA, bootable=True)
    build_fat(fat.image, fat.sectors,
              {"syslinux.cfg": SOURCES / "syslinux.cfg", "vmlinuz": kernel, "initrd.gz": initrd})
    write_disk(raw, total_sectors, [fat], int(digest[:8], 16))


def write_outputs(stage, raw):
    """qcow2 and xz beside the raw disk, and SHA256SUMS over the three."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(stage / "tiny.qcow2")])
    # -0: the disk is mostly the kernel's own xz payload; higher levels cost CPU and save under 0.1 %.
    run(["xz", "-k", "-T2", "-0", str(raw)])
    write_sha256sums(stage, OUTPUTS)


class TinyImage(ImageBuilder):
    prog = "build-tiny-image"
    description = __doc__.split("\n", maxsplit=1)[0]

    def default_output(self, args):
        return DEFAULT_OUTPUT

    def outputs(self, args):
        return [*OUTPUTS, "SHA256SUMS"]

    def inputs(self, args):
        """The wrapper, images/tiny/*, diskimage.py, package versions, syslinux (its boot code is in the image)."""
        versions = source_versions()
        files = [ROOT / "scripts" / "build-tiny-image", ROOT / "images" / "diskimage.py", *source_files(SOURCES)]
        lines = [f"{name}={version}" for name, version in sorted(versions.items())]
        lines += host_tool_versions("syslinux", "syslinux-common", "mtools")
        return inputs_digest(self.stamp_format, files, lines), versions

    def build(self, plan, digest, work, stage):
        packages = resolve_packages(plan)
        kernel_deb, busybox_deb = download(packages)
        log(f"unpacking {kernel_deb.name} and {busybox_deb.name}")
        run(["dpkg-deb", "-x", str(kernel_deb), str(work / "kernel")])
        run(["dpkg-deb", "-x", str(busybox_deb), str(work / "busybox")])
        module_root = next((work / "kernel" / "lib" / "modules").iterdir())
        index = ModuleIndex(module_root)
        modules, built_in = module_closure(index, builtin_modules(module_root))
        log(f"kernel {module_root.name}; modules: {' '.join(modules)}; built in: {' '.join(built_in) or '-'}")
        initrd = work / "initrd.gz"
        initrd.write_bytes(build_initramfs(work / "busybox" / "bin" / "busybox", module_root, modules, index))
        build_disk(stage / "tiny.raw", work, next((work / "kernel" / "boot").glob("vmlinuz-*")), initrd, digest)
        write_outputs(stage, stage / "tiny.raw")
        return {"packages": dict(packages), "kernel": module_root.name, "modules": modules, "built_in": built_in,
                "disk_mib": DISK_MIB, "initrd_bytes": initrd.stat().st_size}


if __name__ == "__main__":
    sys.exit(main(TinyImage()))
