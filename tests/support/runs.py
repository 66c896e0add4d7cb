"""The small reference run every end-to-end test trains, and its uninterrupted digest."""

from __future__ import annotations

import pytest

from spotrunner import exitcodes
from tests.support.processes import SpotrunnerProcess

# Small enough to train in a few seconds on 2 cores, long enough to interrupt mid-epoch.
RUN = ["run", "--dataset", "synthetic", "--synthetic-size", "2000", "--epochs", "3", "--batch-size", "32",
       "--threads", "1", "--seed", "7"]


def run_args(store: str, *extra: str, interval: str = "0.2", run_id: str = "exact", metadata: str = "off") -> list[str]:
    return [*RUN, "--store", store, "--run-id", run_id, "--checkpoint-interval", interval, "--metadata", metadata,
            *extra]


@pytest.fixture(scope="session")
def reference_digest(tmp_path_factory) -> str:
    """weights_sha256 of the reference run never interrupted (local store; the store must not matter)."""
    store = str(tmp_path_factory.mktemp("reference"))
    proc = SpotrunnerProcess(run_args(store))
    try:
        assert proc.wait_exit(timeout=180) == exitcodes.OK, proc.output()
        return proc.wait_event("training_completed")["weights_sha256"]
    finally:
        proc.kill_group()
