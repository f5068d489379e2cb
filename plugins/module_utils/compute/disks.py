# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Instance disks: qcow2 overlays on cached images, fresh ephemeral disks, sizes (grown, never shrunk).

Sizes of existing disks are read from the qcow2 header (no qemu-img run), so a re-run with nothing to
change starts no process.
"""

import os
import re
import struct

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput

QCOW2_MAGIC = b"QFI\xfb"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1024 ** 3, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
MIN_SIZE = 1024 ** 2


def parse_size(value, option="disk_size"):
    """Bytes from ``10G``, ``512M``, ``20GiB`` or a bare number of GiB; InvalidInput naming ``option``."""
    if isinstance(value, bool):
        value = None
    match = _SIZE_RE.match(str(value)) if value is not None else None
    if match is None:
        raise InvalidInput("%s %r is not a size: use e.g. 10G, 512M or 20GiB (a bare number means GiB)"
                           % (option, value), **{option: value})
    size = int(float(match.group(1)) * _FACTORS[match.group(2).upper()])
    if size < MIN_SIZE:
        raise InvalidInput("%s %r is too small: at least 1M" % (option, value), **{option: value})
    # qcow2 sizes are whole sectors.
    return (size + 511) // 512 * 512


def human(size):
    """``size`` bytes as a short text (10G, 1536M) for messages."""
    for unit, factor in (("T", 1024 ** 4), ("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if size and size % factor == 0:
            return "%d%s" % (size // factor, unit)
    return "%d bytes" % size


def qcow2_header(path):
    """``{"virtual_size", "backing_file"}`` from a qcow2 header, or None when ``path`` is not qcow2."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(32)
            if len(header) < 32 or header[:4] != QCOW2_MAGIC:
                return None
            backing_offset, backing_length = struct.unpack(">QI", header[8:20])
            size = struct.unpack(">Q", header[24:32])[0]
            backing = None
            if backing_offset and backing_length:
                handle.seek(backing_offset)
                backing = handle.read(backing_length).decode("utf-8", "replace")
    except OSError as error:
        raise HostError("cannot read disk %s: %s" % (path, error), path=path) from error
    return {"virtual_size": size, "backing_file": backing}


def virtual_size(path):
    """The virtual size of a qcow2 (header) or raw (file size) disk in bytes."""
    header = qcow2_header(path)
    if header is not None:
        return header["virtual_size"]
    return os.path.getsize(path)


def create_overlay(path, base, base_format, size=None):
    """A qcow2 overlay at ``path`` backed by ``base``; ``size`` bytes when given (else the base's size)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", base, path]
    if size is not None:
        argv.append(str(size))
    commands.run(argv)


def create_blank(path, size):
    """A fresh, empty qcow2 disk of ``size`` bytes (replacing any file at ``path``)."""
    remove(path)
    commands.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])


def grow(path, size):
    """Grow the (unused) disk at ``path`` to ``size`` bytes with qemu-img; never shrinks."""
    current = virtual_size(path)
    if size < current:
        raise InvalidInput("disk %s is %s; shrinking it to %s is not allowed" % (path, human(current), human(size)),
                           path=path, size=size)
    if size > current:
        commands.run(["qemu-img", "resize", "-q", "-f", "qcow2", path, str(size)])


def remove(path):
    """Delete ``path`` if it exists."""
    try:
        os.unlink(path)
    except OSError:
        if os.path.exists(path):
            raise
