"""bench/placement.py runs in quick mode: 4 controllers place at once, no host is overbooked, rates and their
ratio to plain puts are reported (never judged by wall time)."""

import json
import subprocess
import sys

import pytest
from harness.paths import ROOT

pytestmark = pytest.mark.integration


def test_placement_bench_quick_mode_reports_ratio_and_overbooks_nothing():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "placement.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    assert result.returncode == 0, report.get("problems") or result.stderr[-4000:]
    assert report["controllers"] == 4 and report["rounds"] == 1
    for field in ("placements_per_s", "puts_per_s", "ratio", "placed", "no_capacity"):
        assert report[field] > 0, field
    assert report["overbooked_hosts"] == 0
    assert report["problems"] == []
    assert report["placed"] + report["no_capacity"] == report["instances"]
    assert report["keys_left"] == 0
