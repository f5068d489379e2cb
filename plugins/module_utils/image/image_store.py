# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The image cache on disk: entries keyed by URL, their metadata, locks and qemu-img helpers.

Layout of ``cache_dir``::

    <sha256(url)>.<format>        the image, renamed into place when complete
    <sha256(url)>.<format>.json   metadata: source URL, digests, validators, sizes, last use
    <sha256(url)>.lock            exists only while a run holds the entry's lock
    .<sha256(url)>.*.partial      a download, conversion or metadata write in progress
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput, LockTimeout

DEFAULT_CACHE_DIR = "/var/lib/smallcloud/images"
FORMATS = ("qcow2", "raw")
METADATA_VERSION = 1
LOCK_WAIT = 3600
ENTRY_NAME = re.compile(r"^(?P<key>[0-9a-f]{64})\.(?P<format>%s)$" % "|".join(FORMATS))
QEMU_IMG_TIMEOUT = 3600
READ_CHUNK = 1 << 20


def entry_key(url):
    """The cache key of a URL: its sha256, so no URL can name a path outside the cache."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


class Entry:
    """One cached image: ``path``, ``meta_path`` and ``lock_path`` inside ``cache_dir``."""

    def __init__(self, cache_dir, key, image_format):
        self.cache_dir = cache_dir
        self.key = key
        self.format = image_format
        self.name = "%s.%s" % (key, image_format)
        self.path = inside(cache_dir, self.name)
        self.meta_path = self.path + ".json"
        self.lock_path = inside(cache_dir, key + ".lock")

    def read_metadata(self):
        """The metadata dict, or None when missing or unreadable."""
        try:
            with open(self.meta_path) as handle:
                meta = json.load(handle)
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def current(self):
        """The metadata when the image is present and has the recorded size, else None."""
        meta = self.read_metadata()
        if meta is None:
            return None
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return None
        return meta if meta.get("size") == size else None

    def write_metadata(self, meta):
        """Write the metadata atomically (temporary file in the cache dir, then rename); the temporary file is
        named as the entry's partial files are, so that one a killed writer left is swept with them."""
        atomic_write(self.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n", prefix=".%s.meta." % self.key)

    def exists(self):
        return os.path.lexists(self.path) or os.path.lexists(self.meta_path)

    def remove(self):
        """Delete the metadata first (an image without metadata is never used), then the image."""
        for path in (self.meta_path, self.path):
            try:
                os.unlink(path)
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise HostError("cannot remove %s: %s" % (path, error.strerror), path=path) from error

    def remove_stale_partials(self):
        """Delete partial files a killed run left; only call this holding the entry's lock."""
        prefix = ".%s." % self.key
        for name in os.listdir(self.cache_dir):
            if name.startswith(prefix) and name.endswith(".partial"):
                remove_quietly(os.path.join(self.cache_dir, name))

    def partial(self, suffix):
        """A new empty temporary file for this entry in the cache dir: (fd, path)."""
        try:
            return tempfile.mkstemp(dir=self.cache_dir, prefix=".%s." % self.key, suffix=suffix)
        except OSError as error:
            raise not_writable(self.cache_dir, error) from error


def inside(cache_dir, name):
    """``cache_dir/name``, refusing any name that would resolve outside ``cache_dir``."""
    base = os.path.realpath(cache_dir)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.dirname(path) != base or name in ("", ".", ".."):
        raise InvalidInput(
            "%r is not a name inside the cache dir %s" % (name, cache_dir), name=name, cache_dir=cache_dir
        )
    return path


def not_writable(cache_dir, error):
    return HostError(
        "cache_dir %s is not writable: %s" % (cache_dir, getattr(error, "strerror", None) or error),
        cache_dir=cache_dir,
    )


def atomic_write(path, text, prefix=".meta."):
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=prefix, suffix=".partial")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path):
    """Delete ``path`` if it exists; cleanup must not hide the error that caused it."""
    try:
        os.unlink(path)
    except OSError:
        pass


def ensure_cache_dir(cache_dir):
    """Create ``cache_dir`` if missing; return True when this call created it."""
    if os.path.isdir(cache_dir):
        return False
    if os.path.lexists(cache_dir):
        raise HostError("cache_dir %s exists and is not a directory" % cache_dir, cache_dir=cache_dir)
    try:
        os.makedirs(cache_dir, 0o755)
    except OSError as error:
        raise not_writable(cache_dir, error) from error
    return True


def check_writable(cache_dir):
    """Best-effort check for check mode, which must not create anything."""
    probe = cache_dir
    while not os.path.isdir(probe):
        if os.path.lexists(probe):
            raise HostError("cache_dir %s: %s is not a directory" % (cache_dir, probe), cache_dir=cache_dir)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HostError("cache_dir %s is not writable (%s)" % (cache_dir, probe), cache_dir=cache_dir)


class EntryLock:
    """An exclusive fcntl lock on an entry's lock file, removed again on release.

    Removing a lock file is only safe because every taker checks, once it holds the lock, that the
    path still names the file it locked; otherwise it locked a file a previous holder had unlinked.
    """

    def __init__(self, path, timeout=LOCK_WAIT):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        deadline = time.time() + self.timeout
        while True:
            fd = self._open()
            if self._try_lock(fd):
                self.fd = fd
                return self
            os.close(fd)
            if time.time() > deadline:
                raise LockTimeout("another run held %s for over %d seconds" % (self.path, self.timeout), lock=self.path)
            time.sleep(0.05)

    def _open(self):
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise not_writable(os.path.dirname(self.path), error) from error

    def _try_lock(self, fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise HostError("cannot lock %s: %s" % (self.path, error.strerror), lock=self.path) from error
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except OSError:
            return False

    def __exit__(self, *exc):
        remove_quietly(self.path)
        os.close(self.fd)
        self.fd = None
        return False


# Listing --------------------------------------------------------------------------------------


def list_entries(cache_dir):
    """Every entry in ``cache_dir`` that has an image or metadata file, sorted by name."""
    try:
        names = os.listdir(cache_dir)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return []
        raise HostError("cannot list cache_dir %s: %s" % (cache_dir, error.strerror), cache_dir=cache_dir) from error
    found = set()
    for name in names:
        match = ENTRY_NAME.match(name[:-5] if name.endswith(".json") else name)
        if match:
            found.add((match.group("key"), match.group("format")))
    return [Entry(cache_dir, key, image_format) for key, image_format in sorted(found)]


def file_sha256(path):
    """sha256 of a file's bytes as ``sha256:<hex>``."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(READ_CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


# qemu-img -------------------------------------------------------------------------------------


def image_info(path, backing_chain=False):
    """``qemu-img info --output=json`` (force-share, so images in use by a guest can be read)."""
    argv = ["qemu-img", "info", "--output=json", "-U"] + (["--backing-chain"] if backing_chain else []) + [path]
    _rc, out, _err = commands.run(argv, timeout=120)
    try:
        return json.loads(out)
    except ValueError:
        raise HostError("qemu-img info %s gave no JSON" % path, path=path, stdout=out) from None


def convert(source, source_format, dest, dest_format):
    """``qemu-img convert`` (sparse: zero clusters are not written)."""
    commands.run(
        ["qemu-img", "convert", "-f", source_format, "-O", dest_format, source, dest], timeout=QEMU_IMG_TIMEOUT
    )


def disk_usage(path):
    """Bytes allocated on disk for ``path`` (smaller than its size when sparse)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
