"""startup-script.sh: shellcheck-clean, and end to end in a scratch root.

The script runs for real (bash, curl, sha256sum, flock) against the tests' own metadata
server; only the commands that would change the machine (systemctl, apt-get, useradd,
getent, gcloud, the Python that builds the venv and its pip) are stubs that record
their calls, so each test can say exactly what a boot did.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.processes import REPO

SCRIPT = Path(REPO) / "startup-script.sh"
UNIT = Path(REPO) / "systemd" / "spotrunner.service"
OPS_AGENT_CONFIG = Path(REPO) / "systemd" / "ops-agent-spotrunner.yaml"

# Each stub appends its argv to $STUB_DIR/calls.log as "name arg arg ...".
_RECORD = 'printf "%s %s\\n" "$(basename "$0")" "$*" >>"$STUB_DIR/calls.log"\n'
STUBS = {
    "systemctl": _RECORD + '[ "$1" = is-active ] && exit 3\nexit 0\n',
    "apt-get": _RECORD + "exit 0\n",
    "useradd": _RECORD + 'touch "$STUB_DIR/user-exists"\n',
    "getent": (
        '[ "$1 $2" = "passwd spotrunner" ] && [ -e "$STUB_DIR/user-exists" ] '
        '&& echo "spotrunner:x:998:998::/var/lib/spotrunner:/usr/sbin/nologin" && exit 0\nexit 2\n'
    ),
    "gcloud": _RECORD + 'if [ "$1 $2" = "storage cp" ]; then echo wheel > "$4/$(basename "$3")"; fi\n',
    # The interpreter the venv is built from: answers the script's probes, and
    # `-m venv DIR` makes a venv whose pip "installs" spotrunner.
    "python3": (
        'case "$1" in\n'
        "  -c)\n"
        '    case "$2" in\n'
        '      *"import torch"*) exit "${STUB_TORCH:-1}" ;;\n'
        '      *print*) echo 3.11 ;;\n'
        "    esac\n"
        "    exit 0 ;;\n"
        "  -m)\n"
        + _RECORD.replace("$(basename \"$0\")", "python3")
        + '    dir="${!#}"\n'
        '    mkdir -p "$dir/bin"\n'
        '    cp "$STUB_DIR/pip.template" "$dir/bin/pip"\n'
        "    exit 0 ;;\n"
        "esac\n"
        "exit 1\n"
    ),
}
PIP_STUB = (
    _RECORD
    + 'bin="$(dirname "$0")"\n'
    + 'printf "#!/bin/sh\\nexit 0\\n" > "$bin/spotrunner"\nchmod +x "$bin/spotrunner"\n'
)


class Boot:
    """Runs startup-script.sh in a scratch root with recording stubs; one object per VM."""

    def __init__(self, tmp_path: Path, metadata_host: str):
        self.root = tmp_path / "root"
        self.stubs = tmp_path / "stubs"
        self.console = tmp_path / "console"
        self.root.mkdir()
        self.stubs.mkdir()
        self.console.touch()
        for name, body in STUBS.items():
            self._write_stub(self.stubs / name, body)
        self._write_stub(self.stubs / "pip.template", PIP_STUB)
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "INSTALL_ROOT": str(self.root),
            "GCE_METADATA_HOST": metadata_host,
            "STUB_DIR": str(self.stubs),
            "SYSTEMCTL": str(self.stubs / "systemctl"),
            "APT_GET": str(self.stubs / "apt-get"),
            "USERADD": str(self.stubs / "useradd"),
            "GETENT": str(self.stubs / "getent"),
            "GCLOUD": str(self.stubs / "gcloud"),
            "PYTHON": str(self.stubs / "python3"),
            "CONSOLE": str(self.console),
        }

    @staticmethod
    def _write_stub(path: Path, body: str) -> None:
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def run(self, **env: str) -> subprocess.CompletedProcess:
        """One boot: the script's result; the call log starts empty for each boot."""
        (self.stubs / "calls.log").unlink(missing_ok=True)
        return subprocess.run(
            ["bash", str(SCRIPT)], env={**self.env, **env}, capture_output=True, text=True, timeout=60
        )

    def calls(self, name: str | None = None) -> list[str]:
        log = self.stubs / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if name is None or line.split(" ", 1)[0] == name]

    @property
    def unit(self) -> Path:
        return self.root / "etc/systemd/system/spotrunner.service"

    @property
    def ops_agent_config(self) -> Path:
        return self.root / "etc/google-cloud-ops-agent/config.yaml"


@pytest.fixture
def boot(tmp_path, metadata_server):
    return Boot(tmp_path, metadata_server.host_port)


def set_attribute(server, key: str, value: str | None, scope: str = "instance") -> None:
    server.set_value(f"{scope}/attributes/{key}", value)


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it: apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_embedded_unit_and_ops_agent_config_match_the_repo_files():
    """The script is one self-contained file; its copies must not drift from systemd/."""
    unit = subprocess.run(["bash", str(SCRIPT), "--print-unit"], capture_output=True, text=True, check=True)
    config = subprocess.run(["bash", str(SCRIPT), "--print-ops-agent-config"], capture_output=True, text=True,
                            check=True)
    assert unit.stdout == UNIT.read_text()
    assert config.stdout == OPS_AGENT_CONFIG.read_text()


def test_first_boot_installs_and_second_boot_is_a_noop(boot, metadata_server):
    set_attribute(metadata_server, "spotrunner-store", "gs://bucket/runs")
    set_attribute(metadata_server, "spotrunner-run-id", "cifar-1")
    # From project metadata: the script falls back to it like GCE's own agents.
    set_attribute(metadata_server, "spotrunner-install", "spotrunner==0.1.0", scope="project")
    (boot.root / "etc/google-cloud-ops-agent").mkdir(parents=True)
    boot.ops_agent_config.write_text("# <== Enter custom agent configurations in this file.\n")

    first = boot.run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert boot.unit.read_text() == UNIT.read_text()
    assert boot.ops_agent_config.read_text() == OPS_AGENT_CONFIG.read_text()
    venv = boot.root / "opt/spotrunner/venv"
    assert venv.is_symlink() and os.access(venv / "bin/spotrunner", os.X_OK)
    assert any("--system" in call and call.endswith(" spotrunner") for call in boot.calls("useradd"))
    assert boot.calls("python3") == [f"python3 -m venv {os.path.realpath(venv)}"]  # no torch: isolated venv
    assert [call.split()[-1] for call in boot.calls("pip")] == ["spotrunner==0.1.0"]
    systemctl = boot.calls("systemctl")
    assert "systemctl restart google-cloud-ops-agent" in systemctl
    assert systemctl.index("systemctl daemon-reload") < systemctl.index(
        "systemctl enable --now --no-block spotrunner.service")
    assert boot.calls("apt-get") == []  # Python with venv support was already there
    assert "installed spotrunner" in boot.console.read_text()  # the serial console got the story

    unit_mtime = boot.unit.stat().st_mtime_ns
    started = time.monotonic()
    second = boot.run()
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already installed" in second.stdout
    assert boot.calls() == [], "a second boot must not reinstall, restart or reconfigure anything"
    assert boot.unit.stat().st_mtime_ns == unit_mtime
    assert elapsed < 5, f"an installed boot took {elapsed:.1f} s"

    # A new install source is a new install: the stamp is keyed on it.
    set_attribute(metadata_server, "spotrunner-install", "spotrunner==0.2.0", scope="project")
    third = boot.run()
    assert third.returncode == 0, third.stdout + third.stderr
    assert [call.split()[-1] for call in boot.calls("pip")] == ["spotrunner==0.2.0"]
    assert boot.calls("useradd") == []  # the user exists now
    assert len(list((boot.root / "opt/spotrunner/venvs").iterdir())) == 1  # the old venv is gone


def test_missing_store_fails_with_one_clear_line(boot, metadata_server):
    set_attribute(metadata_server, "spotrunner-install", "spotrunner==0.1.0")
    result = boot.run()
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert "spotrunner-store is missing" in last and "gcloud compute instances add-metadata" in last
    assert boot.calls() == [] and not boot.unit.exists()


def test_unpinned_git_url_is_refused(boot, metadata_server):
    set_attribute(metadata_server, "spotrunner-store", "gs://bucket/runs")
    set_attribute(metadata_server, "spotrunner-install", "git+https://github.com/example/spotrunner")
    result = boot.run()
    assert result.returncode != 0
    assert "no pinned ref" in result.stdout
    assert not boot.unit.exists()


def test_wheel_from_gcs_on_an_image_with_torch(boot, metadata_server):
    """A Deep Learning VM-like image: the venv sees the system torch; the wheel comes via gcloud."""
    set_attribute(metadata_server, "spotrunner-store", "gs://bucket/runs")
    set_attribute(metadata_server, "spotrunner-install", "gs://bucket/wheels/spotrunner-0.1.0-py3-none-any.whl")
    result = boot.run(STUB_TORCH="0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert boot.calls("gcloud")[0].startswith(
        "gcloud storage cp gs://bucket/wheels/spotrunner-0.1.0-py3-none-any.whl ")
    assert "--system-site-packages" in boot.calls("python3")[0]
    pip_target = boot.calls("pip")[0].split()[-1]
    assert pip_target.endswith("/spotrunner-0.1.0-py3-none-any.whl") and not pip_target.startswith("gs://")
    # No Ops Agent on this image: nothing written or restarted for it.
    assert not boot.ops_agent_config.exists()
    assert not any("google-cloud-ops-agent" in call for call in boot.calls("systemctl"))
