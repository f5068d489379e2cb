"""Image fetch: the image module's code path against `curl | xz -d | tee | sha256sum`, same run.

Builds a qcow2 image (default 160 MiB) of repeated random blocks, sparse zero runs and some fresh
random data, xz-compresses it, serves it over loopback HTTP and fetches it, alternating, with

  * the module's code path (images.run in-process: download, sha256 of the bytes
    served, decompression, sha256 of the result, sparse write, qemu-img info, rename, metadata);
  * the baseline a user would otherwise run: curl -s URL | xz -d | tee OUT | sha256sum.

Reports the best of --rounds for each, their ratio (goal <= 1.15), and the time of a cache-hit
revalidation (one conditional request answered 304). --quick uses a small image (a smoke test).
The compressed input is kept in .cache/bench/ so later runs skip building it.
"""

import argparse
import email.utils
import functools
import hashlib
import http.server
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from harness.module_stub import ModuleStub  # noqa: E402

from ansible_collections.smallcloud.kvm.plugins.module_utils.image import images  # noqa: E402

MiB = 1 << 20
BLOCK = 4096
GOAL = 1.15


def make_raw(path, size_mib, seed=12):
    """Raw disk data: 15% zero MiBs, else 4 KiB blocks from a pool of 256, 5% fresh random."""
    rng = random.Random(seed)
    pool = [rng.randbytes(BLOCK) for _i in range(256)]
    with open(path, "wb") as out:
        for _mib in range(size_mib):
            if rng.random() < 0.15:
                out.seek(MiB, os.SEEK_CUR)
                continue
            blocks = [rng.randbytes(BLOCK) if rng.random() < 0.05 else rng.choice(pool) for _i in range(MiB // BLOCK)]
            out.write(b"".join(blocks))
        out.truncate(size_mib * MiB)


def build_image(size_mib, work, cache=ROOT / ".cache" / "bench"):
    """The qcow2.xz kept in ``cache`` (built once per size), copied into ``work``."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    stored = cache / f"image_fetch-v2-{size_mib}m.qcow2.xz"
    if not stored.exists():
        raw, qcow2 = work / "build.raw", work / "build.qcow2"
        make_raw(raw, size_mib)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
        raw.unlink()
        tmp = stored.with_suffix(".partial")
        with open(tmp, "wb") as out:
            subprocess.run(["xz", "-T2", "-2", "-c", qcow2], stdout=out, check=True)
        qcow2.unlink()
        tmp.rename(stored)
    served = work / "srv"
    served.mkdir()
    shutil.copyfile(stored, served / "image.qcow2.xz")
    return served / "image.qcow2.xz"


class EtagHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with an ETag (mtime + size) and 304 on If-None-Match."""

    def log_message(self, *args):
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        stat = os.stat(path)
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return None
        handle = open(path, "rb")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        self.end_headers()
        return handle

    def copyfile(self, source, outputfile):
        # sendfile: the server should not be what either side waits for.
        os.sendfile(outputfile.fileno(), source.fileno(), 0, os.fstat(source.fileno()).st_size)


def serve(directory):
    """A threading HTTP server for ``directory`` on a free loopback port, in a daemon thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(EtagHandler, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def cpu_seconds():
    """CPU time (user + system) of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_module(url, checksum, cache_dir, force=False):
    """Wall and CPU seconds of one images.run, and its result."""
    start, cpu = time.perf_counter(), cpu_seconds()
    module = ModuleStub(images.MODULE_SPEC, url=url, checksum=checksum, cache_dir=str(cache_dir), force=force,
                        retries=0)
    result = images.run(module)
    return time.perf_counter() - start, cpu_seconds() - cpu, result


def run_baseline(url, out):
    """Wall and CPU seconds of the shell pipeline, and the sha256 it printed."""
    argv = ["bash", "-o", "pipefail", "-c", 'curl -sf "$1" | xz -d | tee "$2" | sha256sum', "bench", url, str(out)]
    start, cpu = time.perf_counter(), cpu_seconds()
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, cpu_seconds() - cpu, proc.stdout.split()[0]


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def measure(size_mib, rounds, input_cache=ROOT / ".cache" / "bench"):
    """Both sides, ``rounds`` times each, alternating; the report as a dict."""
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    server = None
    try:
        image = build_image(size_mib, work, input_cache)
        checksum = "sha256:" + sha256_file(image)
        server = serve(image.parent)
        url = f"http://127.0.0.1:{server.server_address[1]}/{image.name}"
        cache = work / "cache"
        module_times, baseline_times, module_cpu, baseline_cpu = [], [], [], []
        for _round in range(rounds):
            seconds, cpu, digest = run_baseline(url, work / "baseline.qcow2")
            baseline_times.append(seconds)
            baseline_cpu.append(cpu)
            seconds, cpu, result = run_module(url, checksum, cache, force=True)
            module_times.append(seconds)
            module_cpu.append(cpu)
            assert result["file_digest"] == "sha256:" + digest, "module and baseline wrote different files"
            (work / "baseline.qcow2").unlink()
        # The cache hit without a pinned checksum: one conditional request answered 304.
        run_module(url, "skip", cache)
        hit, _cpu, result = run_module(url, "skip", cache)
        assert result["changed"] is False and result["downloaded"] == 0
        return {
            "image_mib": size_mib,
            "compressed_mib": round(image.stat().st_size / MiB, 1),
            "rounds": rounds,
            "baseline_s": round(min(baseline_times), 3),
            "module_s": round(min(module_times), 3),
            "ratio": round(min(module_times) / min(baseline_times), 3),
            "goal": GOAL,
            "baseline_cpu_s": round(min(baseline_cpu), 3),
            "module_cpu_s": round(min(module_cpu), 3),
            "revalidate_s": round(hit, 4),
        }
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=160, help="uncompressed image size (default 160)")
    parser.add_argument("--rounds", type=int, default=3, help="fetches per side; the best counts (default 3)")
    parser.add_argument("--quick", action="store_true", help="8 MiB image, one round: proves the bench runs")
    parser.add_argument("--input-cache", default=str(ROOT / ".cache" / "bench"),
                        help="where the compressed input is kept between runs (default .cache/bench)")
    args = parser.parse_args(argv)
    size, rounds = (8, 1) if args.quick else (args.size_mib, args.rounds)
    report = measure(size, rounds, args.input_cache)
    print(json.dumps(report))
    print(
        f"image fetch, {report['image_mib']} MiB qcow2 ({report['compressed_mib']} MiB xz): "
        f"baseline {report['baseline_s']} s, module {report['module_s']} s, ratio {report['ratio']} "
        f"(goal <= {GOAL}); cache-hit revalidation {report['revalidate_s']} s",
        file=sys.stderr,
    )
    return report


if __name__ == "__main__":
    main()
