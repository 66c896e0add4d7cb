"""Shared fixtures. Each real local server lives in its own module under tests/support/."""

pytest_plugins = [
    "tests.support.processes",
    "tests.support.gcs",
    "tests.support.metadata",
    "tests.support.runs",
    "tests.support.nspawn",
]
