"""MetadataClient against the tests' real metadata server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from spotrunner.metadata import MetadataClient, MetadataError, local_gpus, metadata_host


def test_host_comes_from_gce_metadata_host(metadata_server):
    client = MetadataClient()
    assert client.host == metadata_server.host_port
    assert client.base_url == metadata_server.url
    assert metadata_host({"GCE_METADATA_HOST": "http://10.0.0.1:8080/"}) == "10.0.0.1:8080"
    assert metadata_host({}) == "metadata.google.internal"


def test_get_returns_value_and_none_for_404(metadata_server):
    client = MetadataClient()
    assert client.get("instance/preempted") == "FALSE"
    assert client.get("instance/attributes/not-set") is None
    metadata_server.set_not_found(["instance/zone"])
    assert client.get("instance/zone") is None


def test_every_request_carries_the_flavor_header(metadata_server):
    # The server refuses requests without it, so a 200 through the client proves it was sent.
    bare = requests.get(metadata_server.url + "instance/preempted", timeout=2)
    assert bare.status_code == 403
    assert MetadataClient().get("instance/preempted") == "FALSE"


@pytest.mark.parametrize("status", [503, 429, 500])
def test_server_errors_raise_metadata_error(metadata_server, status):
    client = MetadataClient()
    metadata_server.fail_next(1, status)
    with pytest.raises(MetadataError, match=str(status)):
        client.get("instance/preempted")
    assert client.get("instance/preempted") == "FALSE"


def test_slow_answer_is_a_timeout_error(metadata_server):
    metadata_server.set_delay(2.0)
    started = time.monotonic()
    with pytest.raises(MetadataError, match="Timeout"):
        MetadataClient().get("instance/preempted", timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_garbage_body_is_returned_verbatim_not_interpreted(metadata_server):
    # The client reports what was said; deciding it is not TRUE/FALSE is the watcher's job.
    metadata_server.set_garbage(True)
    value = MetadataClient().get("instance/preempted")
    assert value not in ("TRUE", "FALSE") and "captive" in value


def test_reply_without_flavor_header_is_not_trusted(metadata_server):
    metadata_server.drop_flavor_header(True)
    client = MetadataClient()
    with pytest.raises(MetadataError, match="Metadata-Flavor"):
        client.get("instance/preempted")
    # Not even its 404 counts as "not defined".
    with pytest.raises(MetadataError, match="Metadata-Flavor"):
        client.get("instance/attributes/missing")
    assert client.is_available() is False


def test_is_available(metadata_server):
    assert MetadataClient().is_available() is True
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    started = time.monotonic()
    assert MetadataClient(f"127.0.0.1:{free_port}").is_available(timeout=0.5) is False
    assert time.monotonic() - started < 2


def test_connection_refused_raises_metadata_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    with pytest.raises(MetadataError):
        MetadataClient(f"127.0.0.1:{free_port}").get("instance/preempted", timeout=0.5)


def test_wait_for_change_long_polls_until_timeout(metadata_server):
    client = MetadataClient()
    value, etag = client.get_with_etag("instance/preempted")
    assert value == "FALSE" and etag != "NONE"
    started = time.monotonic()
    assert client.wait_for_change("instance/preempted", etag, 1) == (value, etag)
    assert 0.9 <= time.monotonic() - started < 3
    assert metadata_server.requests_for("instance/preempted") == 2


def test_wait_for_change_returns_on_change(metadata_server):
    client = MetadataClient()
    _, etag = client.get_with_etag("instance/preempted")
    result: list = []
    thread = threading.Thread(target=lambda: result.append(client.wait_for_change("instance/preempted", etag, 30)))
    thread.start()
    deadline = time.monotonic() + 5
    while metadata_server.long_polls_waiting("instance/preempted") == 0:
        assert time.monotonic() < deadline, "long-poll never reached the server"
        time.sleep(0.01)
    flipped = time.monotonic()
    metadata_server.preempt()
    thread.join(5)
    assert result and result[0][0] == "TRUE" and result[0][1] != etag
    assert time.monotonic() - flipped < 1


def test_attributes_instance_first_then_project(metadata_server):
    metadata_server.set_value("instance/attributes/spotrunner-store", "gs://bucket/runs")
    metadata_server.set_value("project/attributes/spotrunner-store", "gs://project-wide")
    metadata_server.set_value("project/attributes/spotrunner-run-id", "run-7")
    assert MetadataClient().attributes(backoff=0.01) == {
        "spotrunner-store": "gs://bucket/runs",
        "spotrunner-run-id": "run-7",
    }


def test_attributes_retry_through_a_503_spell(metadata_server):
    metadata_server.set_value("instance/attributes/spotrunner-config", "epochs = 3\n")
    metadata_server.fail_next(2, 503)
    assert MetadataClient().attributes(retries=3, backoff=0.01) == {"spotrunner-config": "epochs = 3\n"}


def test_attributes_give_up_with_metadata_error(metadata_server):
    metadata_server.fail_next(1000, 503)
    with pytest.raises(MetadataError, match="503"):
        MetadataClient().attributes(retries=2, backoff=0.01)
    assert metadata_server.request_count == 3


def test_instance_facts(metadata_server):
    facts = MetadataClient().instance_facts()
    assert facts["zone"] == "local-drill-a"
    assert facts["machine_type"] == "drill-standard-4"
    assert facts["provisioning_model"] == "SPOT"
    assert facts["hostname"] == "spotrunner-drill.local"
    assert isinstance(facts["gpus"], list)


def test_instance_facts_fall_back_to_preemptible_flag(metadata_server):
    metadata_server.set_value("instance/scheduling/provisioning-model", None)
    metadata_server.set_value("instance/scheduling/preemptible", "FALSE")
    assert MetadataClient().instance_facts()["provisioning_model"] == "STANDARD"


def test_instance_facts_never_raise_without_a_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    facts = MetadataClient(f"127.0.0.1:{free_port}").instance_facts(timeout=0.3)
    assert {k: facts[k] for k in ("zone", "machine_type", "provisioning_model", "hostname")} == dict.fromkeys(
        ("zone", "machine_type", "provisioning_model", "hostname"))


def test_local_gpus_reads_driver_files(tmp_path):
    for index, model in enumerate(["NVIDIA L4", "NVIDIA L4"]):
        gpu = tmp_path / f"0000:00:0{index}.0"
        gpu.mkdir()
        (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   35\n")
    assert local_gpus(str(tmp_path)) == ["NVIDIA L4", "NVIDIA L4"]
    assert local_gpus(str(tmp_path / "absent")) == []
