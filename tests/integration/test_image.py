"""The image module against a real HTTP server on loopback with ETags and injected faults.

Edge cases of the download code run in-process (images.run with a small stand-in for
AnsibleModule: quick); the module's behaviour as a task (check mode, apply, re-apply, --diff,
concurrent runs, bad input) runs through ansible-playbook.
"""

import email.utils
import hashlib
import io
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness.httpserver import QuietHandler
from harness.module_stub import ModuleStub

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import image_fetch, image_store, images
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput

pytestmark = pytest.mark.integration

MiB = 1 << 20
COMPRESSORS = {"xz": ["xz", "-T1", "-0"], "gz": ["gzip", "-1"], "zst": ["zstd", "-q", "-1"], "bz2": ["bzip2", "-1"]}


class ImageHandler(QuietHandler):
    """Static files under /files/ with ETag and 304, plus fault paths.

    /drop/NAME closes the connection halfway through the body, /flaky/NAME serves corrupted bytes
    while ``corrupt[NAME]`` > 0, /hold/NAME sends half the body and the rest once ``release`` is set,
    /nohead/NAME refuses HEAD (405), /html/... is an HTML error page (text/html), /html-octet/... the
    same page as application/octet-stream.
    """

    corrupt = None  # NAME -> how many more GETs get corrupted bytes; a fresh dict per server
    release = None  # threading.Event that lets /hold/ responses finish; one per server
    html = b"<!DOCTYPE html>\n<html><head><title>Oops</title></head><body>Mirror maintenance</body></html>\n"

    def send_head(self):
        if self.requests is not None:
            self.requests.append((self.command, self.path, dict(self.headers)))
        kind, _sep, name = self.path.lstrip("/").partition("/")
        if kind in ("html", "html-octet"):
            return self._body(self.html, "text/html" if kind == "html" else "application/octet-stream")
        path = os.path.join(self.directory, name)
        if kind == "nohead" and self.command == "HEAD":
            self.send_error(405, "Method Not Allowed")
            return None
        if kind not in ("files", "drop", "flaky", "hold", "nohead") or not os.path.isfile(path):
            self.send_error(404, "Not Found")
            return None
        stat = os.stat(path)
        etag = '"%x-%x"' % (stat.st_mtime_ns, stat.st_size)
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return None
        data = Path(path).read_bytes()
        if kind == "flaky" and self.command == "GET" and self.corrupt.get(name, 0) > 0:
            self.corrupt[name] -= 1
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        self._hold = kind == "hold"
        body = self._body(data, "application/octet-stream", etag=etag, mtime=stat.st_mtime)
        if kind == "drop":
            self.close_connection = True
            return io.BytesIO(data[: len(data) // 2])
        return body

    def _body(self, data, content_type, etag=None, mtime=None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(mtime, usegmt=True))
        self.end_headers()
        return io.BytesIO(data)

    def copyfile(self, source, outputfile):
        if not getattr(self, "_hold", False):
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.release.wait(120)
        outputfile.write(data[len(data) // 2 :])
        return None


def image_module(check_mode=False, **params):
    """The image module's stand-in for in-process edge cases: no retries and a short timeout unless given."""
    return ModuleStub(images.MODULE_SPEC, check_mode=check_mode, **{"retries": 0, "timeout": 10, **params})


def sha256(path):
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sums(directory):
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and "SUMS" not in p.name)
    lines = ["%s *%s\n" % (sha256(directory / n).split(":")[1], n) for n in names]
    (directory / "SHA256SUMS").write_text("".join(lines))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A 4 MiB raw disk with 256 KiB of data, as raw, qcow2 and xz/gz/zst/bz2, plus SHA256SUMS."""
    directory = tmp_path_factory.mktemp("images")
    raw = directory / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "4M"], check=True)
    with open(raw, "r+b") as handle:
        handle.seek(MiB)
        handle.write(os.urandom(128 << 10) + b"smallcloud" * 13000)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(directory / "disk.qcow2")],
                   check=True)
    for suffix, argv in COMPRESSORS.items():
        with open(directory / ("disk.raw." + suffix), "wb") as out:
            subprocess.run(argv + ["-c", str(raw)], stdout=out, check=True)
    write_sums(directory)
    return directory


@pytest.fixture
def served(image_dir, http_server, tmp_path):
    """A private copy of the images, served with ImageHandler; ``served.cache`` is an empty cache dir."""
    directory = tmp_path / "srv"
    directory.mkdir()
    for path in image_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    handler = type("Handler", (ImageHandler,), {"corrupt": {}, "release": threading.Event()})
    server = http_server(directory, handler=handler)
    server.directory = directory
    server.handler = handler
    server.cache = tmp_path / "cache"
    return server


def converge(server, check_mode=False, **params):
    params.setdefault("cache_dir", str(server.cache))
    return images.run(image_module(check_mode=check_mode, **params))


def cache_is_empty(cache):
    return not cache.exists() or not any(cache.iterdir())


def gets(server, path):
    return [r for r in server.requests if r[0] == "GET" and r[1] == path]


# In-process: what one fetch does -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["disk.raw.xz", "disk.raw.gz", "disk.raw.zst", "disk.raw.bz2", "disk.raw", "disk.qcow2"]
)
def test_fresh_fetch_decompresses_converts_and_records(served, name):
    source = served.directory / name
    result = converge(served, url=served.url("files/" + name), checksum=sha256(source))
    assert result["changed"] is True and result["cached"] is False
    assert result["digest"] == sha256(source)
    assert result["downloaded"] == source.stat().st_size
    assert result["virtual_size"] == 4 * MiB and result["format"] == "qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", result["path"]],
                                     capture_output=True, check=True).stdout)
    assert info["format"] == "qcow2"
    compare = subprocess.run(["qemu-img", "compare", "-q", str(served.directory / "disk.raw"), result["path"]],
                             check=False)
    assert compare.returncode == 0  # the same disk content
    meta = json.loads(Path(result["path"] + ".json").read_text())
    assert meta["url"] == served.url("files/" + name) and meta["digest"] == sha256(source)
    assert meta["file_digest"] == sha256(result["path"]) and meta["etag"] and meta["last_modified"]
    assert meta["size"] == result["size"] == os.path.getsize(result["path"])
    image_name = Path(result["path"]).name
    assert sorted(p.name for p in served.cache.iterdir()) == [image_name, image_name + ".json"]


def test_raw_format_keeps_raw_and_sparse(served):
    result = converge(served, url=served.url("files/disk.raw.xz"), checksum=sha256(served.directory / "disk.raw.xz"),
                      format="raw")
    assert result["path"].endswith(".raw") and result["size"] == 4 * MiB
    assert image_store.disk_usage(result["path"]) < 2 * MiB  # zero runs became holes
    assert sha256(result["path"]) == sha256(served.directory / "disk.raw")


def test_cache_hit_pinned_checksum_makes_no_request(served):
    args = dict(url=served.url("files/disk.raw.xz"), checksum=sha256(served.directory / "disk.raw.xz"))
    converge(served, **args)
    before = len(served.requests)
    again = converge(served, **args)
    assert again["changed"] is False and again["cached"] is True and again["downloaded"] == 0
    assert len(served.requests) == before


def test_conditional_revalidation_and_changed_upstream(served):
    args = dict(url=served.url("files/disk.qcow2"), checksum_url=served.url("files/SHA256SUMS"))
    first = converge(served, **args)
    served.requests.clear()
    hit = converge(served, **args)
    assert hit["changed"] is False and hit["downloaded"] == 0
    assert [(m, p) for m, p, _h in served.requests] == [("HEAD", "/files/disk.qcow2")]  # one conditional request
    assert served.requests[0][2]["If-None-Match"] == json.loads(Path(first["path"] + ".json").read_text())["etag"]
    # Upstream publishes a new image (new ETag) and a new SHA256SUMS.
    image = served.directory / "disk.qcow2"
    subprocess.run(["qemu-img", "resize", "-q", str(image), "8M"], check=True)
    write_sums(served.directory)
    changed = converge(served, **args)
    assert changed["changed"] is True and changed["virtual_size"] == 8 * MiB
    assert changed["digest"] == sha256(image) != first["digest"]
    assert "upstream changed" in changed["actions"][0]


def test_server_refusing_head_is_revalidated_with_a_conditional_get(served):
    args = dict(url=served.url("nohead/disk.qcow2"), checksum="skip")
    converge(served, **args)
    served.requests.clear()
    assert converge(served, **args)["changed"] is False
    assert [(m, p, h.get("If-None-Match") is not None) for m, p, h in served.requests] == [
        ("HEAD", "/nohead/disk.qcow2", True), ("GET", "/nohead/disk.qcow2", True)]


def test_unreachable_mirror_keeps_the_cached_copy_with_a_warning(served):
    args = dict(url=served.url("files/disk.qcow2"), checksum="skip", cache_dir=str(served.cache))
    fetched = images.run(image_module(**args))
    served.stop()
    module = image_module(**args)
    hit = images.run(module)
    assert hit["changed"] is False and hit["path"] == fetched["path"]
    assert "using the cached copy" in module.warnings[0] and args["url"] in module.warnings[0]


def test_partial_files_of_a_killed_run_are_removed(served):
    args = dict(url=served.url("files/disk.qcow2"), checksum="skip")
    result = converge(served, **args)
    stale = served.cache / (".%s.x1y2z3.partial" % result["key"])
    stale.write_bytes(b"half an image")
    assert converge(served, **args)["changed"] is False and not stale.exists()


def test_force_refetches(served):
    args = dict(url=served.url("files/disk.raw.gz"), checksum="skip")
    converge(served, **args)
    forced = converge(served, force=True, **args)
    assert forced["changed"] is True and forced["downloaded"] > 0
    assert len(gets(served, "/files/disk.raw.gz")) == 2


def test_checksum_mismatch_then_retry_succeeds(served):
    served.handler.corrupt["disk.raw.xz"] = 2
    source = served.directory / "disk.raw.xz"
    result = converge(served, url=served.url("flaky/disk.raw.xz"), checksum=sha256(source), retries=2)
    assert result["changed"] is True and result["digest"] == sha256(source)
    assert len(gets(served, "/flaky/disk.raw.xz")) == 3
    assert result["downloaded"] == 3 * source.stat().st_size
    assert not [p for p in served.cache.iterdir() if p.name.endswith(".partial")]


def test_checksum_mismatch_beyond_retries_fails_and_leaves_nothing(served):
    served.handler.corrupt["disk.raw.xz"] = 5
    source = served.directory / "disk.raw.xz"
    with pytest.raises(image_fetch.ChecksumMismatch) as failure:
        converge(served, url=served.url("flaky/disk.raw.xz"), checksum=sha256(source), retries=1)
    assert failure.value.details["expected"] == sha256(source)
    assert failure.value.details["actual"].startswith("sha256:") and failure.value.details["actual"] != sha256(source)
    assert sha256(source) in failure.value.msg and "after 2 attempts" in failure.value.msg
    assert len(gets(served, "/flaky/disk.raw.xz")) == 2
    assert cache_is_empty(served.cache)


def test_corrupt_upstream_file_is_not_retried(served):
    data = bytearray((served.directory / "disk.raw.xz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # the published file itself is broken, checksum and all
    (served.directory / "broken.raw.xz").write_bytes(bytes(data))
    with pytest.raises(image_fetch.DownloadError) as failure:
        converge(served, url=served.url("files/broken.raw.xz"), checksum=sha256(served.directory / "broken.raw.xz"),
                 retries=3)
    assert failure.value.msg.startswith("decompressing %s failed" % served.url("files/broken.raw.xz"))
    assert len(gets(served, "/files/broken.raw.xz")) == 1
    assert cache_is_empty(served.cache)


def test_dropped_connection_is_retried_then_fails_cleanly(served):
    with pytest.raises(image_fetch.DownloadError) as failure:
        converge(served, url=served.url("drop/disk.raw.xz"), checksum="skip", retries=1)
    assert "drop/disk.raw.xz" in failure.value.msg and "after 2 attempts" in failure.value.msg
    assert len(gets(served, "/drop/disk.raw.xz")) == 2
    assert cache_is_empty(served.cache)


@pytest.mark.parametrize("path", ["html/disk.raw.xz", "html-octet/disk.raw.xz"])
def test_html_page_instead_of_image(served, path):
    with pytest.raises(image_fetch.NotAnImage) as failure:
        converge(served, url=served.url(path), checksum="skip", retries=3)
    assert served.url(path) in failure.value.msg
    assert len(gets(served, "/" + path)) == 1  # not retried: it will not get better
    assert cache_is_empty(served.cache)


def test_not_found_names_the_url(served):
    with pytest.raises(image_fetch.DownloadError) as failure:
        converge(served, url=served.url("files/nope.qcow2"), checksum="skip", retries=3)
    assert "HTTP 404" in failure.value.msg and served.url("files/nope.qcow2") in failure.value.msg
    assert len(gets(served, "/files/nope.qcow2")) == 1
    assert cache_is_empty(served.cache)


def test_unreachable_host(served):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = "http://127.0.0.1:%d/disk.qcow2" % port
    with pytest.raises(image_fetch.DownloadError) as failure:
        converge(served, url=url, checksum="skip")
    assert "cannot reach 127.0.0.1:%d" % port in failure.value.msg
    assert cache_is_empty(served.cache)


def test_checksum_url_without_the_file(served):
    (served.directory / "SHA512SUMS").write_text("%s  other.img\n" % ("ab" * 64))
    with pytest.raises(image_fetch.DownloadError) as failure:
        converge(served, url=served.url("files/disk.qcow2"), checksum_url=served.url("files/SHA512SUMS"))
    assert "lists no checksum for disk.qcow2" in failure.value.msg
    assert cache_is_empty(served.cache)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"checksum": "sha256-abc"}, "'sha256-abc' is not ALGORITHM:HEX"),
        ({"checksum": "md5:" + "0" * 32}, "algorithm 'md5' is not supported; use one of sha1"),
        ({"checksum": "sha256:1234"}, "a sha256 digest is 64 hex digits"),
        ({}, "is remote and no checksum was given"),
        ({"retries": -1}, "retries must be an integer >= 0, got -1"),
        ({"checksum": "skip", "url": "ftp://example.com/x.img"}, "'ftp://example.com/x.img' is not an http, https"),
        ({"name": "../../etc/passwd", "url": None}, "'../../etc/passwd' is not a catalog name"),
        ({"name": "nosuch:1", "url": None}, "unknown image name 'nosuch:1'; known names: debian:11, debian:12"),
    ],
)
def test_bad_input_fails_before_any_request(served, params, fragment):
    args = dict(url=served.url("files/disk.qcow2"))
    args.update(params)
    with pytest.raises(InvalidInput) as failure:
        converge(served, **args)
    assert fragment in failure.value.msg
    assert served.requests == [] and cache_is_empty(served.cache)


def test_cache_dir_not_writable(served, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for cache_dir in (str(blocker / "cache"), "/sys/kernel"):
        with pytest.raises(HostError) as failure:
            converge(served, url=served.url("files/disk.qcow2"), checksum="skip", cache_dir=cache_dir)
        assert cache_dir in failure.value.msg
    assert blocker.read_text() == "" and not (Path("/sys/kernel") / "smallcloud").exists()


def test_image_with_a_backing_file_is_refused(served):
    overlay = served.directory / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(served.directory / "disk.qcow2"),
                    "-F", "qcow2", str(overlay)], check=True)
    with pytest.raises(image_fetch.NotAnImage) as failure:
        converge(served, url=served.url("files/overlay.qcow2"), checksum="skip")
    assert "refers to another file" in failure.value.msg
    assert cache_is_empty(served.cache)


def test_file_url_needs_no_checksum_and_state_absent_removes(served):
    url = (served.directory / "disk.raw.bz2").as_uri()
    fetched = converge(served, url=url)
    assert fetched["changed"] is True and fetched["compression"] == "bz2"
    assert converge(served, url=url)["changed"] is False
    checked = converge(served, check_mode=True, url=url, state="absent")
    assert checked["changed"] is True and os.path.exists(fetched["path"])
    removed = converge(served, url=url, state="absent")
    assert removed["changed"] is True and cache_is_empty(served.cache)
    assert converge(served, url=url, state="absent")["changed"] is False


def test_removing_a_remote_image_needs_no_checksum(served):
    """Nothing is fetched when an entry goes, so there is nothing to verify (teardowns name only the URL)."""
    url = served.url("files/disk.raw.xz")
    fetched = converge(served, url=url, checksum_url=served.url("files/SHA256SUMS"))
    assert fetched["changed"] is True and os.path.exists(fetched["path"])
    removed = converge(served, url=url, state="absent")
    assert removed["changed"] is True and cache_is_empty(served.cache)
    with pytest.raises(InvalidInput):
        converge(served, url=url)  # fetching one still needs a checksum


def test_catalog_entry_pointing_at_the_local_server(served, tmp_path):
    catalog_file = tmp_path / "catalog.yml"
    urls = (served.url("files/disk.raw.zst"), served.url("files/SHA256SUMS"))
    catalog_file.write_text("local:tiny:\n  url: %s\n  checksum_url: %s\n" % urls)
    result = converge(served, name="local:tiny", url=None, catalog_file=str(catalog_file))
    assert result["changed"] is True and result["url"] == served.url("files/disk.raw.zst")
    assert result["digest"] == sha256(served.directory / "disk.raw.zst")


# Through Ansible ---------------------------------------------------------------------------------


def test_module_check_apply_reapply_diff(ansible, served):
    args = {"url": served.url("files/disk.raw.xz"), "checksum_url": served.url("files/SHA256SUMS"),
            "cache_dir": str(served.cache)}
    checked = ansible.run_module("image", args, check=True, diff=True)
    assert checked["changed"] is True, checked
    assert checked["diff"]["before"]["image"]["state"] == "absent"
    assert checked["diff"]["after"]["image"]["state"] == "present"
    assert cache_is_empty(served.cache) and gets(served, "/files/disk.raw.xz") == []

    applied = ansible.run_module("image", args, diff=True)
    assert applied["changed"] is True and applied["downloaded"] > 0, applied
    assert applied["digest"] == sha256(served.directory / "disk.raw.xz")
    assert applied["diff"]["after"]["image"]["etag"]

    served.requests.clear()
    again = ansible.run_module("image", args, diff=True)
    assert again["changed"] is False and again["downloaded"] == 0 and again["path"] == applied["path"], again
    assert [(m, p) for m, p, _h in served.requests] == [("HEAD", "/files/disk.raw.xz")]

    bad = ansible.run_module("image", {"url": args["url"], "cache_dir": args["cache_dir"], "checksum": "sha256:xyz"})
    assert bad["failed"] is True and "sha256:xyz" in bad["msg"]


def image_module_processes():
    """PIDs of the image module processes (AnsiballZ_image.py) running on this machine now."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"AnsiballZ_image.py" in Path("/proc", pid, "cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            continue
    return pids


def wait_for(condition, what):
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting for " + what
        time.sleep(0.05)


def test_concurrent_runs_download_once(ansible, served):
    args = {"url": served.url("hold/disk.raw.gz"), "checksum": "skip", "cache_dir": str(served.cache)}
    results = {}

    def run(name):
        results[name] = ansible.run_module("image", args)

    first, second = (threading.Thread(target=run, args=(name,)) for name in ("first", "second"))
    try:
        first.start()
        wait_for(lambda: gets(served, "/hold/disk.raw.gz"), "the first run's download")
        running = image_module_processes()
        second.start()
        wait_for(lambda: image_module_processes() - running, "the second run's module")
        time.sleep(1)  # the second run is now waiting for the entry lock the first one holds
        assert gets(served, "/hold/disk.raw.gz") and not [r for r in served.requests if r[0] == "HEAD"]
    finally:
        served.handler.release.set()
        first.join()
        second.join()
    assert not results["first"].get("failed") and not results["second"].get("failed"), results
    assert results["first"]["changed"] is True and results["second"]["changed"] is False
    assert results["second"]["downloaded"] == 0 and results["first"]["path"] == results["second"]["path"]
    assert len(gets(served, "/hold/disk.raw.gz")) == 1  # one download for both runs
    assert not list(served.cache.glob("*.lock")) and not list(served.cache.glob(".*partial"))


def test_unknown_name_through_ansible_lists_known(ansible, tmp_path):
    result = ansible.run_module("image", {"name": "debian:7", "cache_dir": str(tmp_path / "cache")})
    assert result["failed"] is True
    assert "unknown image name 'debian:7'" in result["msg"] and "debian:12" in result["known"]
    assert not (tmp_path / "cache").exists()
