"""bench/image_fetch.py runs (quick mode) and reports both sides, their ratio and a revalidation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_image_fetch_bench_quick_mode(tmp_path):
    argv = [sys.executable, str(ROOT / "bench" / "image_fetch.py"), "--quick", "--input-cache", str(tmp_path)]
    proc = subprocess.run(argv,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["image_mib"] == 8 and report["rounds"] == 1
    assert report["baseline_s"] > 0 and report["module_s"] > 0 and report["revalidate_s"] > 0
    assert report["ratio"] == pytest.approx(report["module_s"] / report["baseline_s"], rel=0.05)
    assert "ratio" in proc.stderr and "revalidation" in proc.stderr
