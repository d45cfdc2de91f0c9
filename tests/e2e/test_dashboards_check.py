"""`make dashboards-check`: a real Prometheus (Debian's package, which the check installs
when it is missing) scrapes a short local run, and every dashboard panel's query has data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "charts" / "rollfleet" / "dashboards"

pytestmark = pytest.mark.e2e


def test_every_dashboard_panel_has_data_in_a_real_prometheus():
    done = subprocess.run(
        [sys.executable, "scripts/dashboards_check.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "prometheus, version 2." in out
    lines = out.splitlines()
    panels = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            panels += 1
            row = [
                line
                for line in lines
                if line.split()[:2] == ["ok", path.stem] and f" {panel['title']} " in line
            ]
            assert row, f"no line for {path.stem} / {panel['title']}:\n{out[-6000:]}"
            assert "series" in row[0] and "=0" not in row[0]
    assert panels >= 25
    assert f"{panels} panels of 5 dashboards all have data" in out
