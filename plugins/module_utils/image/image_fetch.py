# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Image sources and checksums: http(s) and file URLs, conditional revalidation, SHA*SUMS files.

The streaming pass itself (decompression, hashing, sparse writes) is in ``image_stream.py``;
nothing here knows about the cache layout, which ``image_store.py`` owns.
"""

import errno
import email.utils
import hashlib
import os
import re

try:
    from http.client import HTTPException
    from urllib.error import HTTPError, URLError
    from urllib.parse import unquote, urlparse
    from urllib.request import Request, build_opener, url2pathname
except ImportError:  # pragma: no cover
    pass

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput

ALGORITHMS = ("sha1", "sha224", "sha256", "sha384", "sha512")
DIGEST_LENGTHS = {40: "sha1", 56: "sha224", 64: "sha256", 96: "sha384", 128: "sha512"}
SCHEMES = ("http", "https", "file")
SUMS_LIMIT = 16 << 20
USER_AGENT = "smallcloud.kvm.image"


class DownloadError(HostError):
    """The source could not be read; ``transient`` errors (network, 5xx) are worth a retry."""

    def __init__(self, msg, transient=False, **details):
        super().__init__(msg, **details)
        self.transient = transient


class ChecksumMismatch(HostError):
    """The bytes served do not have the expected digest."""


class NotAnImage(HostError):
    """The source is an HTML page or other data that is not a disk image."""


class Checksum:
    """An expected digest: ``algorithm`` (a hashlib name) and lower-case ``hexdigest``."""

    def __init__(self, algorithm, hexdigest):
        self.algorithm = algorithm
        self.hexdigest = hexdigest.lower()

    def __str__(self):
        return "%s:%s" % (self.algorithm, self.hexdigest)

    def __eq__(self, other):
        return isinstance(other, Checksum) and str(self) == str(other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(str(self))


def parse_checksum(value):
    """``ALGORITHM:HEX`` -> Checksum; raise InvalidInput naming the value and what is allowed."""
    if not isinstance(value, str) or ":" not in value:
        raise InvalidInput(
            "checksum %r is not ALGORITHM:HEX (e.g. sha256:<64 hex digits>) or 'skip'" % (value,),
            checksum=value,
            allowed=["%s:<hex>" % name for name in ALGORITHMS] + ["skip"],
        )
    algorithm, _sep, digest = value.partition(":")
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    if algorithm not in ALGORITHMS:
        raise InvalidInput(
            "checksum algorithm %r is not supported; use one of %s" % (algorithm, ", ".join(ALGORITHMS)),
            checksum=value,
            allowed=list(ALGORITHMS),
        )
    length = hashlib.new(algorithm).digest_size * 2
    if len(digest) != length or not re.match(r"^[0-9a-f]+$", digest):
        raise InvalidInput(
            "checksum %r: a %s digest is %d hex digits, got %r" % (value, algorithm, length, digest),
            checksum=value,
        )
    return Checksum(algorithm, digest)


def check_url(url):
    """Raise InvalidInput unless ``url`` is an http, https or file URL with a path."""
    parsed = urlparse(url or "")
    if parsed.scheme not in SCHEMES or not (parsed.netloc or parsed.scheme == "file") or not parsed.path:
        raise InvalidInput(
            "url %r is not an http, https or file URL of an image" % (url,), url=url, allowed=list(SCHEMES)
        )
    return parsed


def url_basename(url):
    """The last path component of ``url``, unquoted (what checksum files list)."""
    return unquote(urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])


_BSD_LINE = re.compile(r"^(?P<algo>[A-Za-z0-9-]+) ?\((?P<name>.+)\) ?= ?(?P<hex>[0-9a-fA-F]+)$")


def _sums_algorithm(sums_name, hexdigest):
    """The algorithm of one digest: the one the file is named after, else by digest length."""
    named = [name for name in ALGORITHMS if name in sums_name.lower()]
    if named and hashlib.new(named[-1]).digest_size * 2 == len(hexdigest):
        return named[-1]
    return DIGEST_LENGTHS.get(len(hexdigest))


def parse_sums(text, filename, sums_name=""):
    """Find ``filename`` in a SHA256SUMS-style text (GNU or BSD lines) -> Checksum, or None."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _BSD_LINE.match(line)
        if match:
            name, hexdigest = match.group("name"), match.group("hex")
        else:
            parts = line.split(None, 1)
            if len(parts) != 2 or not re.match(r"^[0-9a-fA-F]+$", parts[0]):
                continue
            hexdigest, name = parts
            name = name[1:] if name.startswith("*") else name
        if name.strip() in (filename, "./" + filename) or name.strip().rsplit("/", 1)[-1] == filename:
            algorithm = _sums_algorithm(sums_name, hexdigest)
            if algorithm is None:
                raise DownloadError(
                    "checksum file %s lists %s with a digest of %d hex digits, which no supported algorithm has"
                    % (sums_name, filename, len(hexdigest)),
                    checksum_url=sums_name,
                )
            return Checksum(algorithm, hexdigest)
    return None


# Source ---------------------------------------------------------------------------------------


class Source:
    """An open image source: ``read(n)``, ``close()``, validators (``etag``, ``last_modified``), ``length``."""

    def __init__(self, url, stream, **fields):
        self.url = url
        self.stream = stream
        self.etag = fields.get("etag")
        self.last_modified = fields.get("last_modified")
        self.length = fields.get("length")
        self.content_type = fields.get("content_type") or ""

    def read(self, size):
        return self.stream.read(size)

    def close(self):
        self.stream.close()

    @property
    def validators(self):
        return {"etag": self.etag, "last_modified": self.last_modified}


def _file_path(url):
    return url2pathname(urlparse(url).path)


def _file_validators(stat):
    """ETag/Last-Modified of a local file, so file:// sources revalidate like HTTP ones."""
    etag = '"file-%d-%d"' % (stat.st_mtime_ns if hasattr(stat, "st_mtime_ns") else int(stat.st_mtime), stat.st_size)
    return etag, email.utils.formatdate(stat.st_mtime, usegmt=True)


def _open_file(url):
    path = _file_path(url)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DownloadError("cannot read %s: %s" % (url, error.strerror or error), url=url) from error
    etag, last_modified = _file_validators(os.fstat(handle.fileno()))
    return Source(url, handle, etag=etag, last_modified=last_modified, length=os.fstat(handle.fileno()).st_size)


def check_local_source(url):
    """For a file:// URL, the DownloadError a fetch would raise when the file cannot be read, raised now."""
    if urlparse(url).scheme != "file":
        return
    path = _file_path(url)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        reason = os.strerror(errno.ENOENT) if not os.path.exists(path) else "not a readable file"
        raise DownloadError("cannot read %s: %s" % (url, reason), url=url)


def _http_error(url, error, method="GET"):
    """A DownloadError for an HTTPError or URLError; 5xx, 429 and network errors are transient."""
    if isinstance(error, HTTPError):
        transient = error.code >= 500 or error.code in (408, 429)
        message = "%s %s: HTTP %d %s" % (method, url, error.code, error.reason)
        return DownloadError(message, transient=transient, url=url, status=error.code)
    reason = getattr(error, "reason", error)
    host = urlparse(url).netloc
    return DownloadError("cannot reach %s for %s: %s" % (host, url, reason), transient=True, url=url)


def _request(url, method, timeout, headers):
    """Open ``url`` with urllib (proxies and redirects as the environment says); HTTPError on 304."""
    # Only http and https get here (file:// is read directly), so urllib's scheme list is not an issue.
    request = Request(url, method=method, headers=dict({"User-Agent": USER_AGENT}, **headers))  # noqa: S310
    return build_opener().open(request, timeout=timeout)


def open_source(url, timeout):
    """Open ``url`` for reading; raise DownloadError (typed, transient or not) on failure."""
    if urlparse(url).scheme == "file":
        return _open_file(url)
    try:
        response = _request(url, "GET", timeout, {})
    except (HTTPError, URLError, OSError) as error:
        raise _http_error(url, error) from error
    length = response.headers.get("Content-Length")
    return Source(
        url,
        response,
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
        length=int(length) if length and length.isdigit() else None,
        content_type=response.headers.get("Content-Type"),
    )


def revalidate(url, etag, last_modified, timeout):
    """One conditional HEAD request: True when the source still matches the validators.

    Returns None when there are no validators to compare (the caller decides what that means).
    """
    if not etag and not last_modified:
        return None
    if urlparse(url).scheme == "file":
        try:
            now_etag, now_modified = _file_validators(os.stat(_file_path(url)))
        except OSError as error:
            raise DownloadError("cannot read %s: %s" % (url, error.strerror or error), url=url) from error
        return now_etag == etag if etag else now_modified == last_modified
    try:
        return _conditional(url, "HEAD", timeout, (etag, last_modified))
    except DownloadError as error:
        # Some servers (signed object-store URLs) refuse HEAD; a conditional GET is the fallback.
        if error.details.get("status") not in (403, 405, 501):
            raise
    return _conditional(url, "GET", timeout, (etag, last_modified))


def _conditional(url, method, timeout, validators):
    """One conditional request: 304, or validators equal to the cached ones, mean unchanged."""
    etag, last_modified = validators
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        response = _request(url, method, timeout, headers)
    except HTTPError as error:
        if error.code == 304:
            return True
        raise _http_error(url, error, method) from error
    except (URLError, OSError) as error:
        raise _http_error(url, error, method) from error
    response.close()  # a GET answered 200 is not read: the fetch that follows reads it again
    # A server that ignores conditional requests still tells its validators.
    if etag and response.headers.get("ETag"):
        return response.headers.get("ETag") == etag
    return bool(last_modified) and response.headers.get("Last-Modified") == last_modified


def fetch_text(url, timeout, limit=SUMS_LIMIT):
    """The whole (small) document at ``url`` as text, e.g. a SHA256SUMS file."""
    source = open_source(url, timeout)
    try:
        data = source.read(limit + 1)
    except (OSError, HTTPException) as error:
        raise DownloadError("reading %s failed: %s" % (url, error), transient=True, url=url) from error
    finally:
        source.close()
    if len(data) > limit:
        raise DownloadError("%s is larger than %d bytes; not a checksum file" % (url, limit), url=url)
    return data.decode("utf-8", "replace")
