"""GCSStore against the fake-gcs-server emulator behind a fault-injecting proxy: retries, deadlines, corruption, access."""

from __future__ import annotations

import os
import time

import pytest

from spotrunner.errors import ConfigError, CorruptCheckpoint, NotFound, PreconditionFailed, StoreError
from spotrunner.stores import list_runs
from spotrunner.stores.gcs import GCSStore

MiB = 1024 * 1024


@pytest.fixture
def store(fault_proxy):
    return GCSStore(fault_proxy.bucket_url + "/prefix", "run-1")


def test_503_burst_on_create_is_retried(store, fault_proxy):
    fault_proxy.fail_next(2, status=503, methods=["POST"])
    store.create("checkpoints/a.pt", b"payload")
    assert fault_proxy.counts["POST"] == 3
    assert store.read("checkpoints/a.pt") == b"payload"


def test_429_burst_on_read_and_replace_is_retried(store, fault_proxy):
    generation = store.replace("lease.json", b"1", if_generation=None)
    fault_proxy.fail_next(2, status=429)
    assert store.read_versioned("lease.json") == (b"1", generation)
    fault_proxy.fail_next(2, status=429)
    assert store.replace("lease.json", b"2", if_generation=generation) != generation
    assert sum(1 for entry in fault_proxy.log if entry[2] == 429) == 4


def test_a_slow_store_fails_within_the_deadline(store, fault_proxy):
    fault_proxy.delay(30)  # every response held far longer than the deadline
    started = time.monotonic()
    with pytest.raises(StoreError) as failure:
        store.create("checkpoints/slow.pt", b"x" * 1000, deadline=2)
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 3.5, elapsed
    assert store.url in str(failure.value) and "\n" not in str(failure.value)
    fault_proxy.clear()
    # The delayed request did reach the store; retrying the create finds its own bytes there.
    store.create("checkpoints/slow.pt", b"x" * 1000, deadline=5)
    assert store.read("checkpoints/slow.pt") == b"x" * 1000


def test_a_store_that_is_down_fails_within_the_deadline(store, fault_proxy):
    fault_proxy.go_down("reset")
    started = time.monotonic()
    with pytest.raises(StoreError):
        store.put("sessions/s.json", b"{}", deadline=2)
    assert time.monotonic() - started < 3.5
    assert fault_proxy.counts["POST"] >= 2  # it did retry before giving up
    fault_proxy.go_up()
    store.put("sessions/s.json", b"{}", deadline=5)


def test_connection_reset_mid_upload_is_retried_without_corruption(store, fault_proxy):
    data = os.urandom(2 * MiB)
    fault_proxy.reset_next(1, when="mid_upload", methods=["POST"])
    store.create("checkpoints/b.pt", data)
    assert any(entry[2] == "reset_mid_upload" for entry in fault_proxy.log)
    assert fault_proxy.forwarded["POST"] == 1  # the torn upload never reached the store
    assert store.read("checkpoints/b.pt") == data


def test_lost_success_reply_is_recognised_by_checksum(store, fault_proxy):
    data = os.urandom(64 * 1024)
    fault_proxy.reset_next(1, when="after_forward", methods=["POST"])
    store.create("checkpoints/c.pt", data)  # first attempt created it, the retry gets 412 and compares
    assert fault_proxy.forwarded["POST"] == 2
    assert store.read("checkpoints/c.pt") == data
    with pytest.raises(PreconditionFailed):
        store.create("checkpoints/c.pt", os.urandom(64 * 1024))


def test_torn_download_raises_corrupt_checkpoint(store, fault_proxy):
    store.create("checkpoints/d.pt", os.urandom(256 * 1024))
    fault_proxy.truncate_next(1, keep=0.5)
    with pytest.raises(CorruptCheckpoint) as failure:
        store.read("checkpoints/d.pt")
    assert "checkpoints/d.pt" in str(failure.value)
    assert isinstance(failure.value, StoreError)


def test_connection_cut_mid_download_is_retried(store, fault_proxy):
    data = os.urandom(256 * 1024)
    store.create("checkpoints/e.pt", data)
    fault_proxy.truncate_next(1, keep=0.5, honest_length=False)
    assert store.read("checkpoints/e.pt") == data
    assert fault_proxy.counts["GET"] >= 2


def test_objects_over_8_mib_round_trip_through_a_resumable_upload(store, fault_proxy):
    data = os.urandom(9 * MiB)
    fault_proxy.reset_next(1, when="mid_upload", methods=["PUT"])  # the session's data upload is torn once
    store.create("checkpoints/big.pt", data)
    assert fault_proxy.counts["PUT"] == 2  # the resumable session's data went up by PUT, via the proxy
    assert fault_proxy.forwarded["PUT"] == 1
    assert store.read("checkpoints/big.pt") == data
    store.create("checkpoints/big.pt", data)  # an idempotent retry, recognised by checksum


def test_missing_bucket_is_a_config_error_with_the_fix(gcs_bucket):
    store = GCSStore("gs://no-such-bucket-spotrunner/runs", "run-1")
    with pytest.raises(ConfigError) as failure:
        store.check_access()
    message = str(failure.value)
    assert "bucket no-such-bucket-spotrunner does not exist" in message
    assert "gcloud storage buckets create gs://no-such-bucket-spotrunner --location=REGION" in message
    assert "\n" not in message
    with pytest.raises(ConfigError):
        list_runs("gs://no-such-bucket-spotrunner")


def test_access_denied_is_a_config_error_naming_the_role(store, fault_proxy):
    fault_proxy.answer_all(403)
    with pytest.raises(ConfigError) as failure:
        store.check_access()
    message = str(failure.value)
    bucket = fault_proxy.bucket_url[len("gs://"):]
    assert f"access denied to bucket {bucket}" in message
    assert "roles/storage.objectUser" in message
    assert f"gcloud storage buckets add-iam-policy-binding gs://{bucket}" in message
    assert "\n" not in message and "Traceback" not in message
    assert [entry[2] for entry in fault_proxy.log] == [403], fault_proxy.log  # one listing, not retried
    with pytest.raises(StoreError) as read_failure:
        store.read("lease.json")
    assert not isinstance(read_failure.value, NotFound)


def test_missing_object_is_not_found_and_delete_of_absent_is_fine(store):
    with pytest.raises(NotFound):
        store.read("checkpoints/none.pt")
    store.delete("checkpoints/none.pt")
