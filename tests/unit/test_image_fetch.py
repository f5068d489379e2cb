"""The download pass's pure parts: checksums, checksum files, magic bytes, decompression, sparse writes, locks."""

import bz2
import gzip
import hashlib
import io
import lzma
import os
import subprocess
import zlib

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_fetch as fetch
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_store as store
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_stream as stream
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput, LockTimeout

pytestmark = pytest.mark.unit

DATA = os.urandom(300_000) + bytes(2_000_000) + b"smallcloud" * 50_000


def zstd(data):
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


COMPRESS = {
    "xz": lzma.compress,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
    "gzip": gzip.compress,
    "zlib": zlib.compress,
    "bz2": bz2.compress,
    "zstd": zstd,
}


@pytest.mark.parametrize(
    ("value", "algorithm"),
    [("sha256:" + "A" * 64, "sha256"), ("sha512:" + "0" * 128, "sha512"), (" SHA1 : " + "f" * 40, "sha1")],
)
def test_parse_checksum(value, algorithm):
    parsed = fetch.parse_checksum(value)
    assert parsed.algorithm == algorithm and parsed.hexdigest == value.split(":")[1].strip().lower()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("abc", "is not ALGORITHM:HEX"), ("md5:" + "0" * 32, "'md5' is not supported; use one of sha1, sha224"),
     ("sha256:" + "0" * 63, "a sha256 digest is 64 hex digits"), ("sha256:" + "g" * 64, "64 hex digits")],
)
def test_parse_checksum_rejects(value, fragment):
    with pytest.raises(InvalidInput) as failure:
        fetch.parse_checksum(value)
    assert fragment in failure.value.msg and repr(value) in failure.value.msg + repr(failure.value.details)


def test_parse_sums_gnu_bsd_and_algorithm_choice():
    a256, b512, c1 = "a" * 64, "b" * 128, "c" * 40
    text = "\n".join([
        "# comment", "%s  other.img" % ("0" * 64), "%s *disk.qcow2" % a256,
        "SHA512 (tiny.raw.xz) = %s" % b512, "%s  ./sub/old.img" % c1, "garbage line",
    ])
    assert str(fetch.parse_sums(text, "disk.qcow2", "SHA256SUMS")) == "sha256:" + a256
    assert str(fetch.parse_sums(text, "tiny.raw.xz", "SHA512SUMS")) == "sha512:" + b512
    assert str(fetch.parse_sums(text, "old.img", "CHECKSUMS")) == "sha1:" + c1  # by digest length
    assert fetch.parse_sums(text, "missing.img", "SHA256SUMS") is None
    with pytest.raises(fetch.DownloadError):
        fetch.parse_sums("abcd  odd.img\n", "odd.img", "SUMS")


def test_url_checks_and_basename():
    assert fetch.url_basename("https://h/a/b/debian%2012.qcow2?x=1") == "debian 12.qcow2"
    for bad in ("ftp://h/x.img", "http://", "/local/path.img", "", None):
        with pytest.raises(InvalidInput):
            fetch.check_url(bad)


@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_magic_bytes(compression):
    assert stream.detect_compression(COMPRESS[compression](DATA)[:64]) == compression


@pytest.mark.parametrize(
    "head", [b"QFI\xfb\x00\x00\x00\x03", bytes(512), b"\xebc\x90\x10\x8e\xd0\xbc\x00", b"<!DOCTYPE html>"]
)
def test_images_are_not_mistaken_for_compression(head):
    assert stream.detect_compression(head) is None


def chunked(data, size=65536):
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("in_process", [True, False])
@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_decompress_round_trip(compression, in_process, monkeypatch):
    if in_process:  # the stdlib path (the xz command may be missing on a host); zstd has only the pipe
        monkeypatch.setitem(stream.PIPE_DECODERS, "xz", ["smallcloud-no-such-xz"])
    out = b"".join(stream.decompress(compression, iter(chunked(COMPRESS[compression](DATA)))))
    assert out == DATA


@pytest.mark.parametrize("compression", ["gzip", "bz2", "xz"])
def test_concatenated_streams(compression):
    half = len(DATA) // 2
    data = COMPRESS[compression](DATA[:half]) + COMPRESS[compression](DATA[half:])
    assert b"".join(stream.decompress(compression, iter(chunked(data)))) == DATA


@pytest.mark.parametrize("compression", sorted(COMPRESS))
def test_truncated_stream_is_an_error(compression):
    data = COMPRESS[compression](DATA)
    with pytest.raises(fetch.DownloadError):
        for _piece in stream.decompress(compression, iter(chunked(data[: len(data) * 2 // 3]))):
            pass


def test_stream_to_hashes_served_and_written_bytes(tmp_path):
    served = lzma.compress(DATA)
    source = fetch.Source("file:///x.xz", io.BytesIO(served), length=len(served))
    target = tmp_path / "out"
    with open(target, "wb") as handle:
        result = stream.stream_to(source, handle, "sha512")
    assert str(result.digest) == "sha512:" + hashlib.sha512(served).hexdigest()
    assert str(result.file_digest) == "sha256:" + hashlib.sha256(DATA).hexdigest()
    assert result.compression == "xz" and result.downloaded == len(served) and result.size == len(DATA)
    assert target.read_bytes() == DATA


def test_stream_to_short_body_is_a_transient_error(tmp_path):
    source = fetch.Source("http://h/x.raw", io.BytesIO(DATA[:1000]), length=len(DATA))
    with pytest.raises(fetch.DownloadError) as failure, open(tmp_path / "out", "wb") as handle:
        stream.stream_to(source, handle, "sha256")
    assert failure.value.transient and "ended after 1000 of" in failure.value.msg


def test_sparse_writer_leaves_holes(tmp_path):
    path = tmp_path / "sparse"
    writer = stream.SparseWriter(open(path, "wb"))
    for piece in (b"x" * 4096, bytes(stream.CHUNK), bytes(stream.CHUNK), b"y" * 10, bytes(stream.CHUNK)):
        writer.write(piece)
    writer.close()
    assert path.stat().st_size == 3 * stream.CHUNK + 4106
    assert path.stat().st_blocks * 512 < stream.CHUNK
    with open(path, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == writer.hasher.hexdigest()


def test_entry_lock_excludes_and_cleans_up(tmp_path):
    lock_path = str(tmp_path / "k.lock")
    with store.EntryLock(lock_path):
        with pytest.raises(LockTimeout) as failure:
            with store.EntryLock(lock_path, timeout=0.2):
                pass
        assert failure.value.details["lock"] == lock_path
    assert not os.path.exists(lock_path)
    with store.EntryLock(lock_path):  # free again
        assert os.path.exists(lock_path)


def test_a_metadata_write_that_died_before_its_rename_is_swept_with_the_entry(tmp_path, monkeypatch):
    """A run killed while writing an entry's metadata leaves its temporary file: the entry's next locked run
    (or its removal) sweeps it with the entry's other partial files."""
    entry = store.Entry(str(tmp_path), "a" * 64, "qcow2")
    entry.write_metadata({"size": 1})
    other = store.Entry(str(tmp_path), "b" * 64, "qcow2")

    def killed(_source, _target):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "rename", killed)
    monkeypatch.setattr(store, "remove_quietly", lambda path: None)  # as SIGKILL: no cleanup runs
    with pytest.raises(KeyboardInterrupt):
        entry.write_metadata({"size": 2})
    monkeypatch.undo()
    left = [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    assert len(left) == 1
    other.remove_stale_partials()
    assert os.path.exists(tmp_path / left[0])  # another entry's sweep leaves it alone
    entry.remove_stale_partials()
    assert sorted(os.listdir(tmp_path)) == [entry.name + ".json"]


def test_names_cannot_escape_the_cache(tmp_path):
    assert store.inside(str(tmp_path), "a" * 64 + ".qcow2") == str(tmp_path / ("a" * 64 + ".qcow2"))
    for name in ("../x", "/etc/passwd", "a/../../b", "..", ""):
        with pytest.raises(InvalidInput):
            store.inside(str(tmp_path), name)
