"""What the image builders share: logging and tools, input digests, MBR disks with a syslinux FAT, publishing.

Each builder (images/tiny/build.py, images/debian/build.py) is a stdlib Python script run by a
scripts/build-*-image wrapper. It subclasses ImageBuilder and hands an instance to main(), which
parses OUTPUT_DIR and --force, takes a lock per output directory, skips the build when the inputs
digest matches the output's build-info.json, and otherwise builds in a scratch directory beside
the output and swaps the finished directory in. Disks are written without loop devices or mounts:
the partition images are plain files (mtools for FAT, mkfs -d for ext4) copied to their offsets.
"""

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTOR = 512
PARTITION_START = 2048  # sectors: the usual 1 MiB alignment
# CHS geometry recorded in the partition table and the FAT boot sector; SeaBIOS and mbr.bin use LBA anyway.
HEADS, SECTORS_PER_TRACK = 64, 32
FAT16_LBA, FAT32_LBA, LINUX = 0x0E, 0x0C, 0x83  # MBR partition types
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")

LOG = logging.getLogger("diskimage")


class BuildError(Exception):
    """A step failed; main() prints the message after the program's name and exits 1."""


def log(message):
    LOG.info(message)


def run(argv, **kwargs):
    """Run a tool; on failure raise BuildError with its output."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


# --- inputs ----------------------------------------------------------------------------------

def source_files(directory):
    """The files of a builder's source directory (no dot files, no byte code), sorted."""
    return [path for path in sorted(directory.iterdir())
            if path.is_file() and not path.name.startswith(".") and path.suffix != ".pyc"]


def host_tool_versions(*packages):
    """["package=version"] of host tools whose output ends up in the image, for the inputs digest."""
    out = run(["dpkg-query", "-W", "-f", "${Package}=${Version}\\n", *packages])
    return out.split()


def inputs_digest(stamp_format, files, lines):
    """Hash of the builder's files (by path under the repository) and of other inputs, one per line."""
    digest = hashlib.sha256(f"format={stamp_format}\n".encode())
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


# --- disk ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    """A primary partition: its contents as an image file, where it starts and how long it is (sectors)."""

    image: Path
    start: int
    sectors: int
    type: int
    bootable: bool = False


def chs(lba):
    cylinder, rest = divmod(lba, HEADS * SECTORS_PER_TRACK)
    head, sector = divmod(rest, SECTORS_PER_TRACK)
    cylinder = min(cylinder, 1023)
    return bytes([head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF])


def master_boot_record(partitions, disk_signature):
    """syslinux's mbr.bin, which boots the active partition, plus the partition table."""
    boot_code = SYSLINUX_MBR.read_bytes()[:440]
    entries = b"".join(
        (b"\x80" if part.bootable else b"\0") + chs(part.start) + bytes([part.type])
        + chs(part.start + part.sectors - 1) + struct.pack("<II", part.start, part.sectors)
        for part in partitions)
    return (boot_code.ljust(440, b"\0") + struct.pack("<I", disk_signature) + b"\0\0"
            + entries.ljust(64, b"\0") + b"\x55\xaa")


def build_fat(path, sectors, files, label="SMALLCLOUD", start=PARTITION_START):
    """A FAT filesystem image with syslinux installed; mtools only, so no loop device or root mount.

    files maps names in the filesystem's root to host paths (modification times are kept).
    """
    with open(path, "wb") as image:
        image.truncate(sectors * SECTOR)
    # -H: hidden sectors = the partition's offset, which the FAT boot sector uses to find itself.
    run(["mformat", "-i", str(path), "-T", str(sectors), "-h", str(HEADS), "-s", str(SECTORS_PER_TRACK),
         "-H", str(start), "-v", label, "::"])
    run(["syslinux", "--install", str(path)])
    for name, source in files.items():
        run(["mcopy", "-i", str(path), "-m", str(source), f"::{name}"])


def copy_data(source, target, offset):
    """Copy a file's data extents to offset in target; holes stay holes, so a mostly empty ext4 costs nothing."""
    fd = os.open(source, os.O_RDONLY)
    try:
        size, position = os.fstat(fd).st_size, 0
        while position < size:
            try:
                position = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, position, os.SEEK_HOLE)
            target.seek(offset + position)
            while position < end:
                block = os.pread(fd, min(1 << 20, end - position), position)
                target.write(block)
                position += len(block)
    finally:
        os.close(fd)


def write_disk(raw, total_sectors, partitions, disk_signature):
    """A raw MBR disk of total_sectors holding the partitions' images at their offsets (sparse)."""
    with open(raw, "wb") as disk:
        disk.write(master_boot_record(partitions, disk_signature))
        for part in partitions:
            if part.image.stat().st_size > part.sectors * SECTOR:
                raise BuildError(f"{part.image.name} is larger than its partition ({part.sectors} sectors)")
            copy_data(part.image, disk, part.start * SECTOR)
        disk.truncate(total_sectors * SECTOR)


# --- outputs ---------------------------------------------------------------------------------

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sha256sums(directory, names):
    (directory / "SHA256SUMS").write_text("".join(f"{sha256(directory / name)}  {name}\n" for name in names))


def is_current(output, digest, names):
    """True when output was built from the same inputs and still has all its files."""
    try:
        info = json.loads((output / "build-info.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("inputs") == digest and all((output / name).is_file() for name in names)


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


def mounts_below(directory):
    """Mount points under directory, deepest first (/proc/self/mountinfo writes blanks as octal escapes)."""
    prefix = str(directory) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in mountinfo]
    return sorted((point for point in points if point.startswith(prefix)), reverse=True)


@contextmanager
def scratch_directory(parent, prefix):
    """A directory for the build's work, removed on success and on failure.

    A chroot tool killed half way may leave /proc or /dev mounted inside; those are unmounted first
    so the removal never walks into the host's.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        for point in mounts_below(work):
            subprocess.run(["umount", "--lazy", point], check=False)
        shutil.rmtree(work)


# --- the script skeleton ---------------------------------------------------------------------

class ImageBuilder:
    """One image recipe for main(): subclasses set prog and description and write the methods below."""

    prog = "build-image"  # the wrapper's name, which prefixes every message
    description = ""
    stamp_format = 1  # bump to force a rebuild when the output layout changes

    def add_arguments(self, parser):
        """Options besides OUTPUT_DIR and --force."""

    def default_output(self, args):
        raise NotImplementedError

    def outputs(self, args):
        """Files a finished output directory holds besides build-info.json."""
        raise NotImplementedError

    def inputs(self, args):
        """(digest of everything the images are made from, what build() needs); a cached run is only this."""
        raise NotImplementedError

    def build(self, plan, digest, work, stage):
        """Write the outputs into stage, using work as scratch space; return build-info.json's other fields."""
        raise NotImplementedError


def main(builder, argv=None):
    """Parse the command line, then build under a lock unless the output is current; print the output dir."""
    logging.basicConfig(format=f"{builder.prog}: %(message)s", level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser(prog=builder.prog, description=builder.description)
    parser.add_argument("output", nargs="?", type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    builder.add_arguments(parser)
    args = parser.parse_args(argv)
    output = (args.output or builder.default_output(args)).resolve()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # One builder per output directory: parallel test sessions wait, then find the image current.
        with open(output.parent / f".{output.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            digest, plan = builder.inputs(args)
            if not args.force and is_current(output, digest, builder.outputs(args)):
                log(f"{output} is up to date")
            else:
                with scratch_directory(output.parent, f".{output.name}-build-") as work:
                    stage = work / "out"
                    stage.mkdir()
                    info = {"inputs": digest, **builder.build(plan, digest, work, stage)}
                    (stage / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
                    publish(stage, output)
                log(f"built {output}")
    except BuildError as error:
        sys.exit(f"{builder.prog}: {error}")
    print(output)
    return 0
