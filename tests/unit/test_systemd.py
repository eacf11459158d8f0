"""The example systemd unit is valid for systemd and matches what pyflow does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "examples" / "systemd" / "pyflow.service"


def unit_lines() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong once the binary paths exist (here: this venv's)."""
    pyflow_bin = Path(sys.executable).with_name("pyflow")
    text = UNIT.read_text().replace("/opt/pyflow/bin/pyflow", str(pyflow_bin))
    unit = tmp_path / "pyflow.service"
    unit.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_unit_reloads_with_sighup_and_stops_with_sigterm() -> None:
    u = unit_lines()
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["KillSignal"] == ["SIGTERM"]
    assert u["RestartPreventExitStatus"] == ["2 3"]  # pyflow's exit codes for bad settings / kernel setup
    assert u["NoNewPrivileges"] == ["yes"]
    caps = set(u["CapabilityBoundingSet"][0].split())
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"} <= caps
    # the start becomes the user pyflow: that takes these three, and nothing more
    assert caps - {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"} == {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"}
    assert all(cmd.endswith("--user pyflow") for cmd in u["ExecStart"] + u["ExecStartPre"])
    assert set(u["AmbientCapabilities"][0].split()) == caps
