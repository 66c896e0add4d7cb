"""skypilot.yaml and skypilot-multinode.yaml: valid for SkyPilot's own parser, and right for spotrunner.

SkyPilot is a test-only dependency in its own venv (`.venv-sky`, it pins versions the
runtime venv does not want). It parses offline, with no cloud credentials, but writes
~/.sky, so it runs in a subprocess with a temporary HOME. The tasks' `run` scripts are
also executed by bash with SkyPilot's environment variables and a stub spotrunner, to
prove the command line each node would run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from spotrunner.config import RUN_ID_PATTERN
from tests.support.processes import REPO

pytestmark = pytest.mark.slow  # SkyPilot takes ~5 s to import

SKY_PYTHON = Path(REPO) / ".venv-sky" / "bin" / "python"
SKY_VENV_COMMAND = "python3 -m venv .venv-sky && .venv-sky/bin/pip install skypilot==0.14.1"
TASKS = {"single": Path(REPO) / "skypilot.yaml", "multinode": Path(REPO) / "skypilot-multinode.yaml"}

# Runs inside .venv-sky: parse each task and report what spotrunner relies on.
_PROBE = r"""
import json, sys
import sky
from sky.jobs import recovery_strategy  # noqa: F401  (registers the strategies)
from sky.utils import registry

def strategy_known(name):
    try:
        registry.JOBS_RECOVERY_STRATEGY_REGISTRY.from_str(name)
        return True
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

out = {"bogus_strategy_known": strategy_known("NO_SUCH_STRATEGY"), "tasks": {}}
for path in sys.argv[1:]:
    task = sky.Task.from_yaml(path)
    out["tasks"][path] = {
        "resources": [
            {"use_spot": r.use_spot, "job_recovery": r.job_recovery,
             "strategy_known": strategy_known((r.job_recovery or {}).get("strategy")),
             "cloud": str(r.cloud)}
            for r in task.resources
        ],
        "envs": dict(task.envs), "run": task.run, "setup": task.setup,
        "file_mounts": task.file_mounts or {},
        "storage_mounts": sorted((task.storage_mounts or {}).keys()),
        "num_nodes": task.num_nodes,
    }
print(json.dumps(out, default=str))
"""


def sky_python() -> Path:
    """The .venv-sky interpreter; skips the test (saying how to make it) when it is missing."""
    if not SKY_PYTHON.exists():
        pytest.skip(f"SkyPilot venv missing: {SKY_PYTHON} (create it at the repo root: {SKY_VENV_COMMAND})")
    return SKY_PYTHON


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    home = tmp_path_factory.mktemp("sky-home")
    result = subprocess.run(
        [str(sky_python()), "-c", _PROBE, *map(str, TASKS.values())],
        capture_output=True, text=True, timeout=180, cwd=REPO,
        env={"HOME": str(home), "PATH": os.environ["PATH"], "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"},
    )
    assert result.returncode == 0, f"SkyPilot rejected a task:\n{result.stderr[-3000:]}"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["bogus_strategy_known"] is not True, "the strategy check cannot fail"
    return {name: data["tasks"][str(path)] for name, path in TASKS.items()}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_is_a_recoverable_spot_job(parsed, name):
    task = parsed[name]
    assert task["resources"], "no resources"
    for resources in task["resources"]:
        assert resources["use_spot"] is True
        recovery = resources["job_recovery"]
        assert recovery and resources["strategy_known"] is True, resources
        # 75 = stopped after an emergency checkpoint: recovered, not a user failure.
        assert 75 in recovery["recover_on_exit_codes"]
        # Fenced (73) and config errors (78) must not be recovered into a loop.
        assert not {73, 78} & set(recovery["recover_on_exit_codes"])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_store_is_spotrunners_gcs_store_not_a_fuse_mount(parsed, name):
    task = parsed[name]
    assert task["envs"]["SPOTRUNNER_STORE"].startswith("gs://")
    assert task["file_mounts"] == {} and task["storage_mounts"] == []
    assert "SKYPILOT_TASK_ID" in task["run"] and task["setup"]


def run_task_script(tmp_path: Path, script: str, env: dict[str, str]) -> list[str]:
    """Execute a task's `run` with a stub spotrunner; the argv it was given."""
    home = tmp_path / "home"
    stub = home / "spotrunner-venv" / "bin" / "spotrunner"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$HOME/argv"\n')
    stub.chmod(0o755)
    result = subprocess.run(["bash", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"], **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return (home / "argv").read_text().splitlines()


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# The shape SkyPilot gives managed jobs: sky-managed-<timestamp>_<job name>_<job id>-<task>.
TASK_ID = "sky-managed-2026-11-29-19-30-00-123456_cifar run_7-0"


def test_single_node_run_uses_the_task_id_as_run_id(parsed, tmp_path):
    argv = run_task_script(tmp_path, parsed["single"]["run"], {"SKYPILOT_TASK_ID": TASK_ID})
    assert argv[0] == "run"
    run_id = flag(argv, "--run-id")
    assert RUN_ID_PATTERN.match(run_id) and run_id == TASK_ID.replace(" ", "-")


def test_multinode_run_hands_skypilots_topology_to_torchrun(parsed, tmp_path):
    env = {
        "SKYPILOT_TASK_ID": TASK_ID, "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NODE_IPS": "10.128.0.7\n10.128.0.9", "SKYPILOT_NUM_GPUS_PER_NODE": "4",
    }
    assert parsed["multinode"]["num_nodes"] >= 2
    argv = run_task_script(tmp_path, parsed["multinode"]["run"], env)
    assert {flag(argv, f) for f in ("--run-id",)} == {TASK_ID.replace(" ", "-")}
    assert flag(argv, "--nnodes") == "2" and flag(argv, "--node-rank") == "1"
    assert flag(argv, "--master-addr") == "10.128.0.7"
    assert flag(argv, "--nproc-per-node") == "4"
    assert re.fullmatch(r"[0-9.]+", flag(argv, "--master-addr"))
