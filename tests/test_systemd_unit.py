"""systemd/spotrunner.service: systemd's own verifier accepts it and its exposure score is <= 2.0.

`systemd-analyze verify` needs neither systemd as PID 1 nor root, but it resolves the
unit's dependencies and checks that ExecStart= is executable, so it runs on a scratch
root (`--root`) holding the unit where startup-script.sh puts it, an executable at
/opt/spotrunner/venv/bin/spotrunner, and a copy of the host's system units.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import REPO

UNIT = Path(REPO) / "systemd" / "spotrunner.service"
MAX_EXPOSURE = 2.0
HOST_UNITS = Path("/usr/lib/systemd/system")

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu package: systemd)",
)


def scratch_root(tmp_path: Path, unit_text: str, with_executable: bool = True) -> Path:
    """A root with the unit installed as on a VM; the host's system units make targets resolve."""
    if not HOST_UNITS.is_dir():
        pytest.skip(f"{HOST_UNITS} is missing: no system units for verify to resolve targets against")
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/spotrunner.service").write_text(unit_text)
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    if with_executable:
        binary = root / "opt/spotrunner/venv/bin/spotrunner"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    # --recursive-errors=yes: without it, unknown keys and bad values only warn (exit 0).
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--recursive-errors=yes", "--man=no",
         "spotrunner.service"],
        capture_output=True, text=True, timeout=60,
    )


def test_verify_passes(tmp_path):
    result = verify(scratch_root(tmp_path, UNIT.read_text()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "spotrunner.service" not in result.stderr, result.stderr  # not even a warning


def test_verify_would_catch_a_typo_or_a_missing_binary(tmp_path):
    """The check above can fail: an unknown key and a missing ExecStart binary are errors."""
    typo = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed")
    result = verify(scratch_root(tmp_path / "typo", typo))
    assert result.returncode != 0 and "KilMode" in result.stderr
    result = verify(scratch_root(tmp_path / "nobin", UNIT.read_text(), with_executable=False))
    assert result.returncode != 0 and "/opt/spotrunner/venv/bin/spotrunner" in result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, f"no exposure score in:\n{result.stdout}{result.stderr}"
    return float(match.group(1))


def test_security_exposure_at_most_2(tmp_path):
    score = exposure(UNIT)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}; see `systemd-analyze security --offline=true {UNIT}`"
    # And the parse really reads the score: the unhardened unit scores far worse.
    bare = tmp_path / "spotrunner.service"
    bare.write_text(UNIT.read_text().split("# Hardening.")[0] + "\n[Install]\nWantedBy=multi-user.target\n")
    assert exposure(bare) > 5.0


def test_exit_codes_match_spotrunner():
    """The unit's exit-code policy names the codes spotrunner/exitcodes.py defines."""
    from spotrunner import exitcodes

    text = UNIT.read_text()
    prevent = re.search(r"^RestartPreventExitStatus=(.*)$", text, re.M).group(1).split()
    assert {str(exitcodes.FENCED), str(exitcodes.CONFIG)} <= set(prevent)
    assert re.search(r"^SuccessExitStatus=(.*)$", text, re.M).group(1).split() == [str(exitcodes.STOPPED)]
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(r"^KillMode=mixed$", text, re.M) and re.search(r"^Type=notify$", text, re.M)
