"""Where a run's checkpoints, lease and history live: a small protocol, two implementations.

Keys are '/'-separated paths relative to the run's root (`<store>/<run-id>/`).
A store knows nothing about checkpoints; it offers immutable creates, compare-and-swap
replaces (for the lease), plain puts (for records only one writer ever updates),
reads, listings and deletes. `gs://` URLs stay strings end to end.
"""

from __future__ import annotations

import os
from typing import Protocol, Union

from spotrunner.errors import ConfigError

Generation = Union[int, str]
"""An opaque version token of an object; compare-and-swap writes name the one they saw."""


class Store(Protocol):
    url: str
    """The run root, e.g. `gs://bucket/prefix/run-id` or `/var/lib/spotrunner/runs/run-id`."""

    def read(self, key: str, *, deadline: float | None = None) -> bytes:
        """The object's bytes, verified against the store's own checksum; NotFound if absent."""

    def read_versioned(self, key: str) -> tuple[bytes, Generation]:
        """The object's bytes and its generation; NotFound if absent."""

    def create(self, key: str, data: bytes, *, deadline: float | None = None) -> None:
        """Create an immutable object; PreconditionFailed if another object has the name.

        A retried create that finds its own bytes already there succeeds.
        `deadline` bounds the whole call, retries included (the emergency path sets it).
        """

    def replace(self, key: str, data: bytes, *, if_generation: Generation | None) -> Generation:
        """Compare-and-swap: write only if the object is at `if_generation` (None: absent).

        Returns the new generation; PreconditionFailed when another writer got there first.
        """

    def put(self, key: str, data: bytes, *, deadline: float | None = None) -> None:
        """Overwrite unconditionally (records that only one writer ever updates)."""

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted."""

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    def check_access(self) -> None:
        """Raise ConfigError naming what to fix when the store cannot be written."""


def is_gcs_url(url: str) -> bool:
    return url.startswith("gs://")


def split_gcs_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of `gs://BUCKET[/PREFIX]`; ConfigError if malformed."""
    rest = url[len("gs://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{url!r} names no bucket; use gs://BUCKET[/PREFIX]")
    # GCS bucket naming rules, the parts a typo usually breaks.
    if not (3 <= len(bucket) <= 222) or not all(c.isalnum() or c in "-_." for c in bucket) \
            or not bucket[0].isalnum() or not bucket[-1].isalnum() or bucket.lower() != bucket:
        raise ConfigError(
            f"{bucket!r} is not a valid bucket name; use 3-63 lowercase letters, digits, '-', '_' or '.'"
        )
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ConfigError(f"{url!r} has an empty path segment; remove the doubled '/'")
    return bucket, prefix


def check_store_url(url: str, *, writable: bool = True) -> None:
    """Raise ConfigError if `url` can never be a store (malformed, or a directory we cannot write).

    `writable=False` checks the form only, for commands that just read a run.
    """
    if not url:
        raise ConfigError("empty; use gs://BUCKET[/PREFIX] or a local directory")
    if url.startswith("gs:") and not is_gcs_url(url):
        raise ConfigError(f"{url!r} is not a bucket URL; use gs://BUCKET[/PREFIX]")
    if "://" in url:
        if not is_gcs_url(url):
            scheme = url.split("://", 1)[0]
            raise ConfigError(f"{url!r}: unsupported scheme {scheme!r}; use gs://BUCKET[/PREFIX] or a local directory")
        split_gcs_url(url)
        return
    if not writable:
        return
    path = os.path.abspath(url)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{url!r}: {probe} is not a directory; point --store at a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{url!r}: directory {probe} is not writable by this user; fix its permissions or choose another --store")


def open_store(url: str, run_id: str) -> Store:
    """The store holding run `run_id` under `url` (`gs://…` or a local directory)."""
    check_store_url(url)
    if is_gcs_url(url):
        from spotrunner.stores.gcs import GCSStore

        return GCSStore(url, run_id)
    from spotrunner.stores.local import LocalStore

    return LocalStore(os.path.join(os.path.abspath(url), run_id))


def list_runs(url: str) -> list[str]:
    """Run ids found directly under a store URL."""
    check_store_url(url)
    if is_gcs_url(url):
        from spotrunner.stores.gcs import list_run_ids

        return list_run_ids(url)
    root = os.path.abspath(url)
    if not os.path.isdir(root):
        return []
    return sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
