"""bench/etcd_alloc.py runs in quick mode and reports rates and ratios (never judged by wall time)."""

import json
import subprocess
import sys

import pytest
from harness.paths import ROOT

pytestmark = pytest.mark.integration


def test_etcd_alloc_bench_quick_mode_reports_ratios():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "etcd_alloc.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert [run["clients"] for run in report["runs"]] == [1, 8]
    for run in report["runs"]:
        for field in ("puts_per_s", "ip_allocs_per_s", "vni_allocs_per_s", "ip_ratio", "vni_ratio"):
            assert run[field] > 0, field
    assert report["keys_left"] == 0
