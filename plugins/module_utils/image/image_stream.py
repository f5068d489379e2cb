# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One streaming pass: read the source, hash the bytes as served, decompress, write sparsely.

Work overlaps across threads and processes so a fetch costs about what its slowest part costs:

* xz and zstd go through a filter process (``xz -d -T0``, ``zstd -d``): a feeder thread reads the
  source, hashes it and writes to the filter; the calling thread reads the filter, hashes and writes.
* gzip, zlib, bz2 (and xz/lzma where the xz command is missing) use the stdlib: a reader thread
  reads and hashes, the calling thread decompresses, a writer thread hashes and writes.
* Uncompressed data: a reader thread reads and hashes, the calling thread writes; when the
  checksum is sha256 the digest of what is served is also the digest of what is written.
"""

import bz2
import errno
import hashlib
import lzma
import os
import queue
import shutil
import subprocess
import threading
import zlib

try:
    from http.client import HTTPException
except ImportError:  # pragma: no cover
    HTTPException = OSError

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError
from ansible_collections.smallcloud.kvm.plugins.module_utils.image.image_fetch import (
    Checksum,
    DownloadError,
    NotAnImage,
)

CHUNK = 1 << 20
# How many chunks a reading or writing thread may run ahead (bounded memory).
QUEUE_DEPTH = 16
# Compressions decoded by a filter process. The stdlib has no zstd; for xz, a separate process
# (multi-threaded on multi-block files) measured faster than lzma in-process (bench/image_fetch.py);
# lzma stays the fallback where the xz command is missing.
PIPE_DECODERS = {"zstd": ["zstd", "-d", "-q", "-c"], "xz": ["xz", "-d", "-q", "-c", "-T0"]}
_ZEROS = bytes(CHUNK)


_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))


def detect_compression(head):
    """The compression of a stream from its first bytes: xz, lzma, gzip, zlib, bz2, zstd or None."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[3:4] != b"0":
        return "bz2"
    if len(head) >= 13 and head[0:1] == b"\x5d" and _plausible_lzma_alone(head):
        return "lzma"
    # zlib: deflate with a window of at most 32 KiB and a header checksum (a multiple of 31).
    if len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] * 256 + head[1]) % 31 == 0:
        return "zlib"
    return None


def _plausible_lzma_alone(head):
    """An .lzma header: dictionary size 2^n or 2^n+2^(n-1), size unknown or below 2^48."""
    dict_size = int.from_bytes(head[1:5], "little")
    size = int.from_bytes(head[5:13], "little")
    power = dict_size.bit_length() - 1
    sane_dict = dict_size >= 4096 and dict_size in (1 << power, (1 << power) | (1 << max(power - 1, 0)))
    return sane_dict and (size == (1 << 64) - 1 or size < (1 << 48))


_STDLIB = {
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
    "lzma": lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE),
    "bz2": bz2.BZ2Decompressor,
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "zlib": lambda: zlib.decompressobj(zlib.MAX_WBITS),
}


def _inflate(compression, chunks):
    """Decompress an iterator of chunks with the stdlib; output in pieces of at most CHUNK bytes.

    Concatenated streams (multi-member gzip, pbzip2, xz with padding) are followed to the end, and
    a stream that stops before its end marker is an error (a truncated download).
    """
    decoder = _STDLIB[compression]()
    finished = False
    for chunk in chunks:
        data = chunk
        while data:
            if finished:
                if not data.strip(b"\x00"):
                    break  # padding after the last stream
                decoder, finished = _STDLIB[compression](), False
            out, data, finished = _inflate_step(decoder, data)
            yield from out
    if not finished:
        raise DownloadError("the %s stream ends early: the download is truncated or corrupt" % compression)


def _inflate_step(decoder, data):
    """Feed ``data``; return (output pieces, unused input, stream finished)."""
    out = []
    zlib_style = not hasattr(decoder, "needs_input")
    try:
        piece = decoder.decompress(data, CHUNK)
        while True:
            if piece:
                out.append(piece)
            if decoder.eof:
                return out, decoder.unused_data, True
            if zlib_style:
                if not decoder.unconsumed_tail:
                    return out, b"", False
                piece = decoder.decompress(decoder.unconsumed_tail, CHUNK)
            else:
                if decoder.needs_input:
                    return out, b"", False
                piece = decoder.decompress(b"", CHUNK)
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as error:
        raise DownloadError("the compressed data is corrupt: %s" % error) from error


def _pipe_stream(argv, chunks):
    """Decompress through a filter process: a feeder thread writes ``chunks``, this generator reads."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as error:
        raise HostError("cannot run %s to decompress the image: %s" % (argv[0], error), argv=argv) from error
    failure = []

    def feed():
        try:
            for chunk in chunks:
                process.stdin.write(chunk)
        except Exception as error:  # noqa: BLE001 - handed to the reading side, which raises it
            failure.append(error)
        finally:
            try:
                process.stdin.close()
            except OSError:
                pass

    feeder = threading.Thread(target=feed, name="decompress-feed")
    feeder.daemon = True
    feeder.start()
    try:
        while True:
            piece = process.stdout.read(CHUNK)
            if not piece:
                break
            yield piece
    finally:
        process.stdout.close()
        if feeder.is_alive() and not failure:
            process.kill()  # the consumer stopped early: do not leave the filter waiting for input
        rc = process.wait()
        feeder.join()
        stderr = process.stderr.read().decode("utf-8", "replace").strip()
        process.stderr.close()
    # A filter that fails closes its input; the feeder's broken pipe is a consequence, not the cause.
    if failure and not (rc != 0 and isinstance(failure[0], (IOError, OSError)) and failure[0].errno == errno.EPIPE):
        raise failure[0]
    if rc != 0:
        raise DownloadError("%s failed (exit %d): %s" % (" ".join(argv), rc, stderr or "corrupt or truncated data"))


def _pipe_argv(compression):
    """The filter command for ``compression``, or None to decompress in-process."""
    argv = PIPE_DECODERS.get(compression)
    if argv and (compression not in _STDLIB or shutil.which(argv[0])):
        return argv
    return None


def decompress(compression, chunks):
    """Iterator of decompressed pieces for an iterator of ``chunks`` (identity when ``compression`` is None)."""
    if compression is None:
        return chunks
    argv = _pipe_argv(compression)
    return _pipe_stream(argv, chunks) if argv else _inflate(compression, chunks)


# The pass -------------------------------------------------------------------------------------


class _Served:
    """The source as served: every read is counted and hashed with the checksum's algorithm."""

    def __init__(self, source, algorithm):
        self.source = source
        self.hasher = hashlib.new(algorithm)
        self.count = 0

    def read(self):
        chunk = self.source.read(CHUNK)
        self.hasher.update(chunk)
        self.count += len(chunk)
        return chunk

    def iterate(self, first):
        """``first``, then every further chunk, read in whichever thread iterates."""
        chunk = first
        while chunk:
            yield chunk
            chunk = self.read()

    def drain(self):
        """Read (and hash) what is left."""
        while self.read():
            pass

    @property
    def digest(self):
        return Checksum(self.hasher.name, self.hasher.hexdigest())


class _Reader:
    """Reads ahead in a thread and hands chunks over a bounded queue."""

    def __init__(self, served):
        self.served = served
        self._queue = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="image-reader")
        self._thread.daemon = True

    def _run(self):
        try:
            while not self._stop.is_set():
                chunk = self.served.read()
                if not chunk:
                    break
                self._queue.put(chunk)
            self._queue.put(None)
        except Exception as error:  # noqa: BLE001 - re-raised by the consuming thread
            self._queue.put(error)

    def chunks(self, first):
        """``first``, then every chunk in order; raises the reader's error where it happened."""
        if not first:
            return
        self._thread.start()
        yield first
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def stop(self):
        """Let the thread end (drain the queue so a blocked put returns)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass


class SparseWriter:
    """Writes to a file, seeking over all-zero pieces so the file stays sparse; hashes what it writes."""

    def __init__(self, handle, hashed=True):
        self.handle = handle
        self.hasher = hashlib.sha256() if hashed else None
        self.size = 0
        self.head = b""

    def write(self, piece):
        if self.hasher is not None:
            self.hasher.update(piece)
        if len(self.head) < 4096:
            self.head += piece[: 4096 - len(self.head)]
        try:
            if len(piece) <= CHUNK and piece == _ZEROS[: len(piece)]:
                self.handle.seek(len(piece), os.SEEK_CUR)
            else:
                self.handle.write(piece)
        except OSError as error:
            raise HostError("writing %s failed: %s" % (self.handle.name, error), path=self.handle.name) from error
        self.size += len(piece)

    def close(self):
        """Fix the length (a trailing hole needs a truncate) and close."""
        try:
            self.handle.truncate(self.size)
        finally:
            self.handle.close()


class _WriterThread:
    """Runs a SparseWriter in its own thread, so hashing and writing overlap in-process decompression."""

    def __init__(self, writer):
        self.writer = writer
        self.error = None
        self._queue = queue.Queue(QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="image-writer")
        self._thread.daemon = True
        self._thread.start()

    def _run(self):
        while True:
            piece = self._queue.get()
            if piece is None:
                return
            if self.error is None:  # after a failure keep draining, so write() never blocks forever
                try:
                    self.writer.write(piece)
                except Exception as error:  # noqa: BLE001 - re-raised in the producing thread
                    self.error = error

    def write(self, piece):
        if self.error is not None:
            raise self.error
        self._queue.put(piece)

    def finish(self):
        """Wait for every piece to be written; raise the writer's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


class FetchResult:
    """What one pass produced: digests, byte counts, compression, validators and the first bytes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _looks_like_html(source, head):
    if source.content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<!doctype html") or text.startswith(b"<html")


def _truncated(source, count):
    """The transfer stopped before the announced length: worth a retry."""
    error = DownloadError(
        "the connection for %s ended after %d of %d bytes" % (source.url, count, source.length),
        transient=True,
        url=source.url,
        received=count,
        expected_size=source.length,
    )
    error.downloaded = count
    return error


def _copy(compression, served, first, writer):
    """Move every byte from ``served`` through the decoder into ``writer`` (see the module docstring)."""
    argv = _pipe_argv(compression)
    if argv:
        for piece in _pipe_stream(argv, served.iterate(first)):
            writer.write(piece)
        return
    reader = _Reader(served)
    sink = _WriterThread(writer) if compression else writer
    try:
        pieces = reader.chunks(first)
        for piece in _inflate(compression, pieces) if compression else pieces:
            sink.write(piece)
    finally:
        if sink is not writer:
            sink.finish()
        reader.stop()


def stream_to(source, handle, algorithm):
    """Copy ``source`` into the open binary file ``handle`` in one pass; return a FetchResult.

    ``algorithm`` hashes the bytes as served (the published checksum is of those); the written,
    decompressed bytes are hashed with sha256 for the cache's integrity record.
    """
    if _looks_like_html(source, b""):
        raise NotAnImage(
            "%s serves an HTML page (Content-Type: %s), not an image" % (source.url, source.content_type),
            url=source.url,
            content_type=source.content_type,
        )
    served = _Served(source, algorithm)
    writer = None
    try:
        first = served.read()
        compression = detect_compression(first)
        same_bytes = compression is None and algorithm == "sha256"
        writer = SparseWriter(handle, hashed=not same_bytes)
        try:
            _copy(compression, served, first, writer)
        except DownloadError as error:
            # Data that does not decompress may be a bad transfer or a bad file; the digest of
            # everything served tells which, so read the rest before giving up.
            served.drain()
            if source.length is not None and served.count != source.length:
                raise _truncated(source, served.count) from error
            error.msg = "decompressing %s failed: %s" % (source.url, error.msg)
            error.details["url"] = source.url
            error.digest = served.digest
            error.downloaded = served.count
            raise
    except (OSError, HTTPException) as error:
        raise DownloadError(
            "reading %s failed after %d bytes: %s" % (source.url, served.count, error or type(error).__name__),
            transient=True,
            url=source.url,
        ) from error
    finally:
        if writer is not None:
            writer.close()
        else:
            handle.close()
    if source.length is not None and served.count != source.length:
        raise _truncated(source, served.count)
    if _looks_like_html(source, writer.head):
        raise NotAnImage("%s serves an HTML page, not an image" % source.url, url=source.url)
    return FetchResult(
        digest=served.digest,
        file_digest=served.digest if same_bytes else Checksum("sha256", writer.hasher.hexdigest()),
        downloaded=served.count,
        size=writer.size,
        compression=compression,
        head=writer.head,
        etag=source.etag,
        last_modified=source.last_modified,
    )
