"""bench/instance_start.py runs in quick mode and reports both comparisons (never judged by wall time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_instance_bench_quick_mode_reports_ratios(libvirtd):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "instance_start.py"), "--quick", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for field in ("module_s", "baseline_s", "ratio"):
        assert report["start"][field] > 0, field
    for field in ("batch_s", "loop_s", "ratio", "batch_in_process_s"):
        assert report["rerun"][field] > 0, field
    assert report["rerun"]["instances"] == 3
    assert report["rerun"]["floor_s"] > 0 and len(report["rerun"]["round_ratios"]) == 1
    # bench/module_startup.py, run from the instance bench: the module imports, etcd3gw counted as a run loads it.
    for field in ("import_s", "floor_import_s", "etcd3gw_s"):
        assert report["startup"][field] > 0, field
    # Nothing to change: one libvirt connection, one etcd listing, no command.
    assert report["rerun"]["batch_libvirt_connections"] == 1
    assert report["rerun"]["batch_etcd_requests"] == 1
    assert report["rerun"]["batch_commands"] == 0
