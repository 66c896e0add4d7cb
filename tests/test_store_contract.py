"""The Store contract, run against LocalStore and GCSStore (on the fake-gcs-server emulator)."""

from __future__ import annotations

import pytest

from spotrunner.errors import NotFound, PreconditionFailed
from spotrunner.stores import list_runs, open_store
from spotrunner.stores.gcs import GCSStore
from spotrunner.stores.local import LocalStore


@pytest.fixture(params=["local", "gcs"])
def store_url(request, tmp_path):
    """A store URL of each kind: a local directory, or a fresh emulator bucket with a prefix."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("gcs_bucket") + "/team/runs"


@pytest.fixture
def store(store_url):
    return open_store(store_url, "run-1")


def test_open_store_picks_the_implementation(store, store_url):
    if store_url.startswith("gs://"):
        assert isinstance(store, GCSStore)
        assert store.url == f"{store_url}/run-1"
    else:
        assert isinstance(store, LocalStore)
        assert store.url.endswith("/runs/run-1")


def test_create_then_read(store):
    store.create("checkpoints/000000000001-abc.pt", b"\x00weights\xff")
    assert store.read("checkpoints/000000000001-abc.pt") == b"\x00weights\xff"


def test_create_is_immutable(store):
    store.create("final.json", b"first")
    with pytest.raises(PreconditionFailed):
        store.create("final.json", b"second")
    assert store.read("final.json") == b"first"


def test_create_retried_with_the_same_bytes_succeeds(store):
    store.create("checkpoints/x.commit.json", b"same bytes")
    store.create("checkpoints/x.commit.json", b"same bytes")  # a retry whose first reply was lost
    assert store.read("checkpoints/x.commit.json") == b"same bytes"


def test_create_with_the_same_length_but_other_bytes_fails(store):
    store.create("a", b"abcd")
    with pytest.raises(PreconditionFailed):
        store.create("a", b"abce")


def test_missing_key_is_not_found(store):
    with pytest.raises(NotFound):
        store.read("nope.json")
    with pytest.raises(NotFound):
        store.read_versioned("nope.json")


def test_replace_is_compare_and_swap(store):
    first = store.replace("lease.json", b"one", if_generation=None)
    data, generation = store.read_versioned("lease.json")
    assert (data, generation) == (b"one", first)
    with pytest.raises(PreconditionFailed):
        store.replace("lease.json", b"stale", if_generation=None)  # exists already
    second = store.replace("lease.json", b"two", if_generation=first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        store.replace("lease.json", b"three", if_generation=first)  # someone else moved it on
    assert store.read_versioned("lease.json") == (b"two", second)


def test_replace_of_an_absent_object_with_a_generation_fails(store):
    store.replace("x", b"1", if_generation=None)
    _data, generation = store.read_versioned("x")
    store.delete("x")
    with pytest.raises(PreconditionFailed):
        store.replace("x", b"2", if_generation=generation)


def test_put_overwrites(store):
    store.put("sessions/s1.json", b"v1")
    store.put("sessions/s1.json", b"v2")
    assert store.read("sessions/s1.json") == b"v2"


def test_list_returns_relative_sorted_keys_under_a_prefix(store):
    for key in ("sessions/b.json", "sessions/a.json", "checkpoints/000000000002.commit.json",
                "checkpoints/000000000001.commit.json", "lease.json"):
        store.put(key, b"{}")
    assert store.list("checkpoints/") == ["checkpoints/000000000001.commit.json",
                                          "checkpoints/000000000002.commit.json"]
    assert store.list("sessions/") == ["sessions/a.json", "sessions/b.json"]
    assert store.list() == sorted(store.list())
    assert set(store.list()) == {"sessions/a.json", "sessions/b.json", "lease.json",
                                 "checkpoints/000000000001.commit.json", "checkpoints/000000000002.commit.json"}
    assert store.list("nothing/") == []


def test_runs_are_separate_and_listed(store_url):
    one, two = open_store(store_url, "run-a"), open_store(store_url, "run-b")
    one.put("final.json", b"a")
    two.put("final.json", b"b")
    assert one.list() == ["final.json"]
    assert one.read("final.json") == b"a"
    assert list_runs(store_url) == ["run-a", "run-b"]


def test_delete_removes_and_ignores_absent(store):
    store.put("k", b"v")
    store.delete("k")
    with pytest.raises(NotFound):
        store.read("k")
    store.delete("k")
    assert store.list() == []


def test_check_access_passes_on_a_usable_store(store):
    store.check_access()
    assert store.list() == []  # the probe leaves nothing behind
