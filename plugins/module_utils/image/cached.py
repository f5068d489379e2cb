# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Images in the cache: resolve a request, observe its cache entry, plan and run a fetch.

Fetching is one streaming pass (image_fetch.py) into a partial file in the cache dir, checked
against the expected digest (retried up to ``retries`` times), converted with qemu-img when the
source is not yet in the wanted format, then renamed into place with its metadata. Everything for
one entry happens under the entry's lock, so concurrent runs for one URL download once.
"""

import contextlib
import os
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import catalog as image_catalog
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_fetch as fetch
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_store as store
from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_stream as stream
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import Plan

# The image module's own options (plugins/modules/image.py documents them), with its defaults.
IMAGE_OPTIONS = dict(
    url=dict(type="str"),
    name=dict(type="str"),
    checksum=dict(type="str"),
    checksum_url=dict(type="str"),
    catalog=dict(type="dict"),
    catalog_file=dict(type="path"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    format=dict(type="str", default="qcow2", choices=list(store.FORMATS)),
    retries=dict(type="int", default=3),
    timeout=dict(type="int", default=60),
    force=dict(type="bool", default=False),
)
SKIP = "skip"
# Seconds to wait before retry n (capped): quick for a flaky byte, patient enough for a restart.
BACKOFF = (0.2, 1.0, 3.0, 5.0)


class ImageRequest:
    """The validated request: url, expected checksum (or skip / checksum_url), format, limits."""

    def __init__(self, params):
        entry = {}
        if params.get("name"):
            entry = image_catalog.resolve(params["name"], params.get("catalog"), params.get("catalog_file"))
        self.name = params.get("name")
        self.url = params.get("url") or entry["url"]
        self.scheme = fetch.check_url(self.url).scheme
        self.format = params.get("format") or "qcow2"
        self.retries = _at_least("retries", params.get("retries", 3), 0)
        self.timeout = _at_least("timeout", params.get("timeout", 60), 1)
        self.force = bool(params.get("force"))
        self.skip, self.checksum, self.checksum_url = _expected(params, entry, self.url, self.scheme)
        self.warnings = []

    def expected(self):
        """The digest the source must have: given, read from checksum_url, or None (skip)."""
        if self.checksum is not None:
            return self.checksum
        if self.checksum_url:
            return published_checksum(self.checksum_url, self.url, self.timeout)
        return None


def _at_least(option, value, minimum):
    if not isinstance(value, int) or value < minimum:
        raise InvalidInput("%s must be an integer >= %d, got %r" % (option, minimum, value), **{option: value})
    return value


def _expected(params, entry, url, scheme):
    """(skip, Checksum or None, checksum_url or None) from the task, else from the catalog entry."""
    checksum, checksum_url = params.get("checksum"), params.get("checksum_url")
    if checksum is None and checksum_url is None:
        checksum, checksum_url = entry.get("checksum"), entry.get("checksum_url")
    if checksum is not None and checksum.strip().lower() == SKIP:
        return True, None, None
    if checksum is not None:
        return False, fetch.parse_checksum(checksum), None
    if checksum_url is not None:
        fetch.check_url(checksum_url)
        return False, None, checksum_url
    if scheme != "file" and params.get("state", "present") == "present":  # removing fetches nothing to verify
        raise InvalidInput(
            "url %s is remote and no checksum was given: set checksum (sha256:<hex>), checksum_url, "
            "or checksum: skip to accept it unverified" % url,
            url=url,
        )
    return True, None, None


def published_checksum(checksum_url, url, timeout):
    """The digest a SHA256SUMS/SHA512SUMS file lists for ``url``'s file name."""
    name = fetch.url_basename(url)
    found = fetch.parse_sums(fetch.fetch_text(checksum_url, timeout), name, fetch.url_basename(checksum_url))
    if found is None:
        raise fetch.DownloadError(
            "checksum_url %s lists no checksum for %s" % (checksum_url, name), checksum_url=checksum_url, file=name
        )
    return found


# Converge -------------------------------------------------------------------------------------


@contextlib.contextmanager
def entry_held(entry):
    """The entry's lock; its cache dir is made when missing, and removed again when a failed first fetch left
    it empty. Partial files of a killed run, whose writer held this lock and is gone, are removed."""
    created = store.ensure_cache_dir(entry.cache_dir)
    try:
        with store.EntryLock(entry.lock_path):
            entry.remove_stale_partials()
            yield
    finally:
        if created and not os.listdir(entry.cache_dir):
            os.rmdir(entry.cache_dir)


def image_url(image):
    """``(url, None)`` for a URL or absolute path, ``(None, name)`` for a catalog shorthand."""
    if "://" in image:
        return image, None
    if image.startswith("/"):
        return "file://" + image, None
    return None, image


def request_for(image, checksum=None, cache_dir=store.DEFAULT_CACHE_DIR):
    """``(ImageRequest, Entry)`` for an image given as a URL, an absolute path or a catalog name, with the
    image module's defaults: for a runner (instance) that caches an image on its own behalf."""
    params = {name: spec.get("default") for name, spec in IMAGE_OPTIONS.items()}
    params["url"], params["name"] = image_url(image)
    params.update(checksum=checksum, cache_dir=cache_dir)
    request = ImageRequest(params)
    return request, store.Entry(cache_dir, store.entry_key(request.url), request.format)


def plan_cached(request, entry):
    """For another runner: ``(plan, facts)``, the plan fetching the image when it is not cached (or stale).

    The fetch step takes the entry's lock itself and fetches only what is still missing then, so runs that
    planned the same fetch at once download it once. ``facts()`` are the image module's result facts.
    """
    store.check_writable(entry.cache_dir)
    meta = entry.current()
    reason = fetch_reason(request, meta)
    plan = Plan()
    fetched = {}
    if reason:
        fetch.check_local_source(request.url)  # a batch refuses a missing local image before changing anything
        plan.add("fetch %s into %s (%s)" % (request.url, entry.path, reason), fetch_locked, request, entry, fetched)
    else:
        plan.after_apply(touch, entry, meta)
    return plan, lambda: facts_of(entry, request, fetched.get("meta", meta), fetched.get("downloaded", 0), reason)


def fetch_locked(request, entry, out):
    """Fetch under the entry's lock unless a concurrent run fetched it meanwhile."""
    with entry_held(entry):
        meta = entry.current()
        if meta is not None and fetch_reason(request, meta) is None:
            out["meta"] = meta
            return
        fetch_into(request, entry, out)


def touch(entry, meta):
    """Record that the entry was used now (image_cache prunes by the last use).

    The instance module does so without the entry's lock: a run holding it may sweep the temporary file away
    meanwhile (as a killed writer's), and then writes or removes the metadata itself.
    """
    meta["last_used"] = int(time.time())
    try:
        entry.write_metadata(meta)
    except FileNotFoundError:
        pass


def describe(entry, meta):
    """The entry as the diff shows it."""
    if meta is None:
        return {"state": "absent", "path": entry.path}
    return {
        "state": "present",
        "path": entry.path,
        "url": meta.get("url"),
        "digest": meta.get("digest"),
        "etag": meta.get("etag"),
        "last_modified": meta.get("last_modified"),
    }


def wanted(entry, request, meta, reason):
    """What the entry will look like; unknown fields of a fetch yet to happen say so."""
    if not reason:
        return describe(entry, meta)
    return {
        "state": "present",
        "path": entry.path,
        "url": request.url,
        "digest": str(request.checksum) if request.checksum else "(known after the fetch)",
        "etag": "(known after the fetch)",
        "last_modified": "(known after the fetch)",
    }


def facts_of(entry, request, meta, downloaded, reason):
    meta = meta or {}
    return dict(
        path=entry.path,
        url=request.url,
        key=entry.key,
        format=request.format,
        digest=meta.get("digest") or (str(request.checksum) if request.checksum else None),
        file_digest=meta.get("file_digest"),
        source_format=meta.get("source_format"),
        compression=meta.get("compression"),
        virtual_size=meta.get("virtual_size"),
        size=meta.get("size"),
        downloaded=downloaded,
        cached=reason is None,
    )


def fetch_reason(request, meta):
    """Why the entry must be (re)fetched, or None when the cached copy is current."""
    if meta is None:
        return "not cached"
    if request.force:
        return "force"
    if meta.get("url") != request.url:
        return "cached entry was fetched from %s" % meta.get("url")
    if request.checksum is not None:
        # A pinned digest that the cached copy has needs no request at all.
        if meta.get("digest") == str(request.checksum):
            return None
        return "cached digest %s is not the requested %s" % (meta.get("digest"), request.checksum)
    return upstream_change(request, meta)


def upstream_change(request, meta):
    """Ask the source whether it changed since the cached fetch (one conditional request)."""
    try:
        fresh = fetch.revalidate(request.url, meta.get("etag"), meta.get("last_modified"), request.timeout)
    except fetch.DownloadError as error:
        if not error.transient:
            raise
        # A mirror that is down must not stop instances from starting on the copy we have.
        request.warnings.append("cannot revalidate %s (%s); using the cached copy" % (request.url, error.msg))
        return None
    if fresh is False:
        return "upstream changed"
    if fresh is None and request.checksum_url:
        published = published_checksum(request.checksum_url, request.url, request.timeout)
        if str(published) != meta.get("digest"):
            return "checksum file lists %s, cached is %s" % (published, meta.get("digest"))
    return None


def fetch_into(request, entry, out):
    """Download with retries and install; fill ``out`` with the metadata and bytes downloaded."""
    attempts = request.retries + 1
    downloaded = 0
    for attempt in range(1, attempts + 1):
        try:
            expected = request.expected()
            result = _download(request, entry, expected, out)
            downloaded += result.downloaded
            out["downloaded"] = downloaded
            return
        except (fetch.ChecksumMismatch, fetch.DownloadError) as error:
            downloaded += out.pop("partial_bytes", 0)
            if attempt == attempts or not _retryable(error):
                error.details["attempts"] = attempt
                if attempt > 1:
                    error.msg += " (after %d attempts)" % attempt
                raise
            time.sleep(BACKOFF[min(attempt - 1, len(BACKOFF) - 1)])


def _retryable(error):
    return isinstance(error, fetch.ChecksumMismatch) or getattr(error, "transient", False)


def _download(request, entry, expected, out):
    """One attempt: stream into a partial file, verify, convert, install. Cleans up on failure."""
    algorithm = expected.algorithm if expected else "sha256"
    fd, partial = entry.partial(".partial")
    try:
        os.close(fd)
        handle = open(partial, "wb")  # by its path, which a write error names (a full cache dir: ENOSPC)
        source = fetch.open_source(request.url, request.timeout)
        try:
            result = stream.stream_to(source, handle, algorithm)
        except fetch.DownloadError as error:
            out["partial_bytes"] = getattr(error, "downloaded", 0)
            _raise_if_mismatch(request.url, expected, getattr(error, "digest", None), error)
            raise
        finally:
            source.close()
            handle.close()
        out["partial_bytes"] = result.downloaded
        _raise_if_mismatch(request.url, expected, result.digest)
        out["meta"] = _install(request, entry, partial, result)
        return result
    finally:
        store.remove_quietly(partial)


def _raise_if_mismatch(url, expected, actual, cause=None):
    """ChecksumMismatch naming both digests when the bytes served are not the expected ones."""
    if expected is None or actual is None or actual == expected:
        return
    error = fetch.ChecksumMismatch(
        "checksum mismatch for %s: expected %s, got %s" % (url, expected, actual),
        url=url,
        expected=str(expected),
        actual=str(actual),
    )
    if cause is not None:
        error.details["decompression"] = cause.msg
    raise error


def _install(request, entry, partial, result):
    """Check the data is a disk image, convert if needed, rename into place, write metadata."""
    info = _check_image(request.url, partial, result)
    final, file_digest = partial, str(result.file_digest)
    if info["format"] != request.format:
        fd, final = entry.partial(".convert.partial")
        os.close(fd)
        try:
            store.convert(partial, info["format"], final, request.format)
            file_digest = store.file_sha256(final)
        except BaseException:
            store.remove_quietly(final)
            raise
    try:
        os.chmod(final, 0o644)
        os.rename(final, entry.path)
    finally:
        store.remove_quietly(final)
    meta = {
        "version": store.METADATA_VERSION,
        "url": request.url,
        "name": request.name,
        "format": request.format,
        "digest": str(result.digest),
        "file_digest": file_digest,
        "etag": result.etag,
        "last_modified": result.last_modified,
        "size": os.stat(entry.path).st_size,
        "virtual_size": info.get("virtual-size"),
        "source_format": info["format"],
        "source_size": result.downloaded,
        "compression": result.compression,
        "fetched": int(time.time()),
        "last_used": int(time.time()),
    }
    entry.write_metadata(meta)
    return meta


def _check_image(url, path, result):
    """qemu-img's view of the data; refuse what is not a standalone disk image."""
    info = store.image_info(path)
    image_format = info.get("format")
    if image_format == "raw" and (result.size == 0 or result.size % 512 or result.head.lstrip()[:1] == b"<"):
        raise fetch.NotAnImage(
            "%s is not a disk image: qemu-img finds no image format in its %d bytes (%r...)"
            % (url, result.size, result.head[:40]),
            url=url,
            size=result.size,
        )
    backing = info.get("backing-filename") or info.get("format-specific", {}).get("data", {}).get("data-file")
    if backing:
        raise fetch.NotAnImage(
            "%s refers to another file (%s); only standalone images can be cached" % (url, backing), url=url
        )
    return info
