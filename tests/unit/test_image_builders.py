"""The guest image builders' shared disk code (images/diskimage.py) and the Debian builder's input checks."""

import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "images"))

import diskimage  # noqa: E402

pytestmark = pytest.mark.unit


def test_an_unknown_release_is_refused_naming_it_and_the_allowed_ones_and_nothing_is_made(tmp_path):
    output = tmp_path / "out"
    result = subprocess.run([str(ROOT / "scripts" / "build-debian-image"), str(output), "--release", "jessie"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "'jessie'" in result.stderr and "'bookworm'" in result.stderr and "'trixie'" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not diskimage.SYSLINUX_MBR.exists(), reason="syslinux's mbr.bin is not installed")
def test_the_partition_table_has_the_bootable_fat_first_and_the_root_last():
    boot = diskimage.Partition(Path("boot.img"), 2048, 393216, 0x0E, bootable=True)
    root = diskimage.Partition(Path("root.img"), 2048 + 393216, 5_000_000, 0x83)
    mbr = diskimage.master_boot_record([boot, root], 0x1234ABCD)
    assert len(mbr) == 512 and mbr[-2:] == b"\x55\xaa"
    assert struct.unpack_from("<I", mbr, 440)[0] == 0x1234ABCD
    entries = [mbr[446 + 16 * i: 462 + 16 * i] for i in range(4)]
    assert entries[0][0] == 0x80 and entries[0][4] == 0x0E
    assert struct.unpack_from("<II", entries[0], 8) == (2048, 393216)
    assert entries[1][0] == 0 and entries[1][4] == 0x83 and struct.unpack_from("<II", entries[1], 8) == (
        2048 + 393216, 5_000_000)
    assert entries[2] == entries[3] == b"\0" * 16


def test_copy_data_keeps_holes_and_places_the_data_at_the_offset(tmp_path):
    source = tmp_path / "fs.img"
    with open(source, "wb") as handle:
        handle.truncate(8 << 20)
        handle.seek(4 << 20)
        handle.write(b"ext4 data")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as target:
        target.truncate(16 << 20)
        diskimage.copy_data(source, target, 1 << 20)
    data = disk.read_bytes()
    assert data[(5 << 20):(5 << 20) + 9] == b"ext4 data" and data.count(b"\0") == len(data) - 9
    assert disk.stat().st_blocks * 512 < (1 << 20)  # still sparse
