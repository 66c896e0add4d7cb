"""The tests' own GCE metadata server: a real HTTP server on 127.0.0.1 (spotrunner.drill)."""

from __future__ import annotations

import pytest

from spotrunner.drill import MetadataServer


@pytest.fixture
def metadata_server(monkeypatch):
    """A started MetadataServer with GCE_METADATA_HOST pointing at it; stopped at teardown.

    Set values, faults and preemption on it from the test (`preempt()`, `fail_next(n)`,
    `set_delay(s)`, ...); `request_count` / `requests_for(path)` tell what clients asked.
    """
    server = MetadataServer().start()
    monkeypatch.setenv("GCE_METADATA_HOST", server.host_port)
    monkeypatch.delenv("GCE_METADATA_ROOT", raising=False)
    try:
        yield server
    finally:
        server.stop()
