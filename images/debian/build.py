"""Build a small Debian cloud image (qcow2) with mmdebstrap, without loop devices or mounts.

    scripts/build-debian-image [OUTPUT_DIR] [--release bookworm] [--force]      (runs this file with python3)

mmdebstrap (root mode, no recommends) installs a minimal system with both of Debian's amd64
kernels, cloud-init, ifupdown with dhclient and openssh-server into a scratch directory;
images/debian/rootfs-hook writes fstab and the locale and removes per-instance state. The disk is
MBR: partition 1 a FAT holding syslinux, both kernels and their initramfs images (mtools and
`syslinux --install`); partition 2, the last so that cloud-init's growpart can grow it, the ext4
root made with `mkfs.ext4 -d` and found by its label.

OUTPUT_DIR (default .cache/images/debian-RELEASE) receives debian-RELEASE.qcow2, which boots
linux-image-cloud-amd64 (the kernel of Debian's genericcloud images), debian-RELEASE-generic.qcow2,
the same disk booting linux-image-amd64, SHA256SUMS and build-info.json. The inputs digest covers
this builder's files, the release, the package list and the host tools, but not the archive's
package versions: a cached run takes well under a second without the network, and --force picks up
Debian's updates.
"""

import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # images/: run as a script, not a package
from diskimage import (  # noqa: E402
    FAT16_LBA, LINUX, PARTITION_START, ROOT, SECTOR, BuildError, ImageBuilder, Partition, build_fat,
    host_tool_versions, inputs_digest, log, main, run, source_files, write_disk, write_sha256sums)

SOURCES = ROOT / "images" / "debian"
RELEASES = ("bookworm", "trixie")
PACKAGES = (
    "linux-image-cloud-amd64",  # the kernel syslinux boots by default, as in Debian's genericcloud images
    "linux-image-amd64",  # all drivers, for debian-RELEASE-generic.qcow2
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "cloud-guest-utils",  # growpart
    "openssh-server",
    "isc-dhcp-client",
    "ifupdown",  # cloud-init's eni renderer writes /etc/network/interfaces.d
    "sudo",
    "locales",
    "e2fsprogs",
    "initramfs-tools",  # MODULES=most: the initramfs has the virtio, SCSI and SATA drivers
    "ca-certificates",
    "netbase",
    "iproute2",
    "procps",
    "less",
)
# Host tools the build runs, with the Debian package to install for each.
TOOLS = {"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "mformat": "mtools", "mcopy": "mtools",
         "syslinux": "syslinux", "qemu-img": "qemu-utils", "dpkg-query": "dpkg"}
ROOT_LABEL = "debian-root"
DISK_MIB = 3072  # virtual size; the qcow2 holds only what is written, and growpart takes the rest at boot
FAT_MIB = 192  # two kernels and their MODULES=most initramfs images: 70 MiB on bookworm, 74 MiB on trixie
CLOUD_SUFFIX = "-cloud-amd64"
APPEND = f"root=LABEL={ROOT_LABEL} ro console=tty0 console=ttyS0,115200 edd=off"


def apt_sources(release):
    return [f"deb http://deb.debian.org/debian {release} main",
            f"deb http://deb.debian.org/debian {release}-updates main",
            f"deb http://deb.debian.org/debian-security {release}-security main"]


def image_names(release):
    """{kernel flavour: qcow2 file name}; the first is the image's default."""
    return {"cloud": f"debian-{release}.qcow2", "generic": f"debian-{release}-generic.qcow2"}


def require_tools():
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise BuildError(f"missing host tools: install them with apt-get install {' '.join(missing)} "
                         "(scripts/apt-packages.txt lists them)")


# --- root filesystem -------------------------------------------------------------------------

def bootstrap(release, rootfs):
    """mmdebstrap the root filesystem; rootfs-hook runs after the essential packages and at the end."""
    hook = f'sh {shlex.quote(str(SOURCES / "rootfs-hook"))} "$1"'
    argv = ["mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
            f"--include={','.join(PACKAGES)}", f"--essential-hook={hook}", f"--customize-hook={hook}",
            release, str(rootfs), *apt_sources(release)]
    log(f"mmdebstrap {release} into {rootfs} (a few minutes)")
    run(argv, env={**os.environ, "ROOT_LABEL": ROOT_LABEL})


def kernel_versions(rootfs):
    """{"cloud": version, "generic": version} of the kernels in the root filesystem's /boot."""
    versions = sorted(path.name.removeprefix("vmlinuz-") for path in (rootfs / "boot").glob("vmlinuz-*"))
    found = {"cloud": [v for v in versions if v.endswith(CLOUD_SUFFIX)],
             "generic": [v for v in versions if not v.endswith(CLOUD_SUFFIX)]}
    if any(len(flavour) != 1 for flavour in found.values()):
        raise BuildError(f"expected one cloud and one generic kernel in /boot, found: {' '.join(versions) or 'none'}")
    kernels = {flavour: names[0] for flavour, names in found.items()}
    for version in kernels.values():
        if not (rootfs / "boot" / f"initrd.img-{version}").is_file():
            raise BuildError(f"no /boot/initrd.img-{version} in the root filesystem")
    return kernels


def check_datasources(rootfs):
    """NoCloud must be in cloud-init's datasource_list: the last one configured, else the built-in one."""
    configs = [rootfs / "etc/cloud/cloud.cfg", *sorted((rootfs / "etc/cloud/cloud.cfg.d").glob("*.cfg"))]
    # ds-identify reads datasource_list only from single-line entries, so a line scan is what counts.
    lists = [line for path in configs if path.is_file() for line in path.read_text().splitlines()
             if line.startswith("datasource_list:")]
    if not lists:
        builtin = rootfs / "usr/lib/python3/dist-packages/cloudinit/settings.py"
        text = builtin.read_text() if builtin.is_file() else ""
        start = text.find('"datasource_list"')
        lists = [text[start:text.find("]", start)]] if start >= 0 else []
    if not lists or "NoCloud" not in lists[-1]:
        raise BuildError(f"cloud-init's datasource_list lacks NoCloud: {lists[-1] if lists else 'not found'}")


def installed_packages(rootfs):
    out = run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Package}=${Version}\\n"])
    return dict(line.split("=", 1) for line in out.split())


# --- disk ------------------------------------------------------------------------------------

def syslinux_cfg(path, default, kernels):
    template = (SOURCES / "syslinux.cfg").read_text()
    path.write_text(template.format(default=default, append=APPEND, **kernels))
    return path


def boot_partition(work, rootfs, kernels):
    """Partition 1: FAT with syslinux (booting the cloud kernel), both kernels and initramfs images."""
    files = {}
    for version in kernels.values():
        for name in (f"vmlinuz-{version}", f"initrd.img-{version}"):
            files[name] = rootfs / "boot" / name
    needed = sum(path.stat().st_size for path in files.values())
    if needed > (FAT_MIB - 4) << 20:  # room for syslinux and the FAT itself
        raise BuildError(f"the kernels and initramfs images take {needed >> 20} MiB, "
                         f"more than the {FAT_MIB} MiB boot partition holds: raise FAT_MIB")
    files["syslinux.cfg"] = syslinux_cfg(work / "syslinux.cfg", "cloud", kernels)
    fat = Partition(work / "boot.img", PARTITION_START, FAT_MIB * 2048, FAT16_LBA, bootable=True)
    log(f"boot partition: {FAT_MIB} MiB FAT, {needed >> 20} MiB of kernels and initramfs images")
    build_fat(fat.image, fat.sectors, files, label="DEBIAN-BOOT")
    return fat


def root_partition(work, rootfs, start, sectors):
    """Partition 2: the ext4 root, made from the directory as a plain file."""
    root = Partition(work / "root.img", start, sectors, LINUX)
    with open(root.image, "wb") as image:
        image.truncate(sectors * SECTOR)
    log(f"mkfs.ext4 -d {rootfs} ({sectors * SECTOR >> 20} MiB)")
    run(["mkfs.ext4", "-q", "-L", ROOT_LABEL, "-d", str(rootfs), str(root.image)])
    return root


def write_images(work, stage, kernels, names):
    """The raw disk once, then one qcow2 per kernel: only syslinux.cfg's DEFAULT differs between them."""
    raw = work / "disk.raw"
    boot_offset = PARTITION_START * SECTOR
    for flavour, name in names.items():
        if flavour != "cloud":
            cfg = syslinux_cfg(work / "syslinux.cfg", flavour, kernels)
            run(["mcopy", "-o", "-i", f"{raw}@@{boot_offset}", str(cfg), "::syslinux.cfg"])
        # -c: a third of the size (~400 MiB, mostly kernel modules); -W lets it compress on both cores.
        run(["qemu-img", "convert", "-q", "-c", "-W", "-f", "raw", "-O", "qcow2", str(raw), str(stage / name)])
    raw.unlink()
    write_sha256sums(stage, list(names.values()))
    return {name: (stage / name).stat().st_size for name in names.values()}


class DebianImage(ImageBuilder):
    prog = "build-debian-image"
    description = __doc__.split("\n", maxsplit=1)[0]

    def add_arguments(self, parser):
        parser.add_argument("--release", default=RELEASES[0], choices=RELEASES,
                            help=f"Debian release (default {RELEASES[0]})")

    def default_output(self, args):
        return ROOT / ".cache" / "images" / f"debian-{args.release}"

    def outputs(self, args):
        return [*image_names(args.release).values(), "SHA256SUMS"]

    def inputs(self, args):
        """The wrapper, images/debian/*, diskimage.py, release, packages and host tools; no apt, no network."""
        require_tools()
        files = [ROOT / "scripts" / "build-debian-image", ROOT / "images" / "diskimage.py", *source_files(SOURCES)]
        lines = [f"release={args.release}", *apt_sources(args.release), *PACKAGES,
                 *host_tool_versions("mmdebstrap", "e2fsprogs", "mtools", "syslinux", "syslinux-common")]
        return inputs_digest(self.stamp_format, files, lines), args.release

    def build(self, plan, digest, work, stage):
        release, rootfs = plan, work / "rootfs"
        bootstrap(release, rootfs)
        kernels = kernel_versions(rootfs)
        check_datasources(rootfs)
        log(f"kernels: {kernels['cloud']} (default), {kernels['generic']}")
        total_sectors = DISK_MIB * 2048
        boot = boot_partition(work, rootfs, kernels)
        root_start = boot.start + boot.sectors
        root = root_partition(work, rootfs, root_start, total_sectors - root_start)
        write_disk(work / "disk.raw", total_sectors, [boot, root], int(digest[:8], 16))
        boot.image.unlink()
        root.image.unlink()
        names = image_names(release)
        sizes = write_images(work, stage, kernels, names)
        return {"release": release, "apt_sources": apt_sources(release), "root_label": ROOT_LABEL,
                "kernels": kernels, "images": {name: flavour for flavour, name in names.items()},
                "disk_mib": DISK_MIB, "boot_mib": FAT_MIB, "sizes": sizes, "include": list(PACKAGES),
                "packages": installed_packages(rootfs)}


if __name__ == "__main__":
    sys.exit(main(DebianImage()))
