"""The local metadata server behind `spotrunner simulate-metadata`, spoken to over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from spotrunner.drill import MetadataServer, serve
from spotrunner.errors import ConfigError
from tests.support.processes import REPO, wait_for

FLAVOR = {"Metadata-Flavor": "Google"}


def get(server: MetadataServer, path: str, **kwargs) -> requests.Response:
    return requests.get(server.url + path, headers=FLAVOR, timeout=kwargs.pop("timeout", 5), **kwargs)


def post(server: MetadataServer, action: str, **kwargs) -> requests.Response:
    return requests.post(f"{server.control_url}/{action}", timeout=5, **kwargs)


def test_flavor_header_is_checked_and_sent(metadata_server):
    refused = requests.get(metadata_server.url + "instance/preempted", timeout=5)
    assert refused.status_code == 403
    answer = get(metadata_server, "instance/preempted")
    assert answer.status_code == 200 and answer.text == "FALSE"
    assert answer.headers["Metadata-Flavor"] == "Google"
    assert answer.headers["ETag"]
    assert get(metadata_server, "instance/attributes/absent").status_code == 404


def test_root_answers_like_gce(metadata_server):
    # google-auth's detection ping: status 200 and the flavor header.
    for url in (metadata_server.url, f"http://{metadata_server.host_port}/"):
        answer = requests.get(url, headers=FLAVOR, timeout=5)
        assert answer.status_code == 200 and answer.headers["Metadata-Flavor"] == "Google"
    assert "instance/" in get(metadata_server, "").text


def test_attributes_and_instance_values():
    server = MetadataServer(attributes={"spotrunner-run-id": "drill-1"},
                            instance={"zone": "projects/1/zones/europe-west4-a"},
                            project_attributes={"spotrunner-store": "gs://b"}).start()
    try:
        assert get(server, "instance/attributes/spotrunner-run-id").text == "drill-1"
        assert get(server, "project/attributes/spotrunner-store").text == "gs://b"
        assert get(server, "instance/zone").text == "projects/1/zones/europe-west4-a"
        assert get(server, "instance/scheduling/provisioning-model").text == "SPOT"
        assert get(server, "instance/service-accounts/default/email").text.endswith(".gserviceaccount.com")
        assert get(server, "instance/attributes/").text == "spotrunner-run-id\n"
    finally:
        server.stop()


def test_long_poll_blocks_until_timeout_and_wakes_on_change(metadata_server):
    etag = get(metadata_server, "instance/preempted").headers["ETag"]
    params = {"wait_for_change": "true", "last_etag": etag, "timeout_sec": "1"}
    started = time.monotonic()
    timed_out = get(metadata_server, "instance/preempted", params=params)
    assert 0.9 <= time.monotonic() - started < 2
    assert (timed_out.text, timed_out.headers["ETag"]) == ("FALSE", etag)

    answers: list[requests.Response] = []
    params["timeout_sec"] = "30"
    waiter = threading.Thread(target=lambda: answers.append(get(metadata_server, "instance/preempted", params=params)))
    waiter.start()
    wait_for(lambda: metadata_server.long_polls_waiting("instance/preempted"), 5, "the long-poll to be held")
    flipped = time.monotonic()
    assert post(metadata_server, "preempt").status_code == 200
    waiter.join(5)
    assert answers and answers[0].text == "TRUE" and answers[0].headers["ETag"] != etag
    assert time.monotonic() - flipped < 1
    # With last_etag NONE (or absent) a long-poll answers at once.
    started = time.monotonic()
    assert get(metadata_server, "instance/preempted",
               params={"wait_for_change": "true", "last_etag": "NONE"}).text == "TRUE"
    assert time.monotonic() - started < 1


def test_stop_ends_held_long_polls(metadata_server):
    etag = get(metadata_server, "instance/preempted").headers["ETag"]
    params = {"wait_for_change": "true", "last_etag": etag, "timeout_sec": "60"}
    outcome: list = []

    def poll() -> None:
        try:
            outcome.append(get(metadata_server, "instance/preempted", params=params).status_code)
        except requests.RequestException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=poll)
    waiter.start()
    wait_for(lambda: metadata_server.long_polls_waiting("instance/preempted"), 5, "the long-poll to be held")
    started = time.monotonic()
    metadata_server.stop()
    waiter.join(5)
    assert outcome and time.monotonic() - started < 2


def test_control_endpoints(metadata_server):
    assert post(metadata_server, "maintenance").json()["maintenance_event"] == "TERMINATE_ON_HOST_MAINTENANCE"
    assert get(metadata_server, "instance/maintenance-event").text == "TERMINATE_ON_HOST_MAINTENANCE"
    migrate = post(metadata_server, "maintenance", params={"value": "MIGRATE_ON_HOST_MAINTENANCE"})
    assert migrate.json()["maintenance_event"] == "MIGRATE_ON_HOST_MAINTENANCE"
    bad = post(metadata_server, "maintenance", params={"value": "REBOOT"})
    assert bad.status_code == 400 and "TERMINATE_ON_HOST_MAINTENANCE" in bad.text
    post(metadata_server, "preempt")
    assert get(metadata_server, "instance/preempted").text == "TRUE"
    state = post(metadata_server, "reset").json()
    assert (state["preempted"], state["maintenance_event"]) == ("FALSE", "NONE")
    assert get(metadata_server, "instance/preempted").text == "FALSE"
    assert post(metadata_server, "explode").status_code == 404


def test_faults_over_http(metadata_server):
    answer = post(metadata_server, "faults", json={"fail_next": 2, "fail_status": 429})
    assert answer.status_code == 200 and answer.json()["faults"]["fail_next"] == 2
    assert [get(metadata_server, "instance/preempted").status_code for _ in range(3)] == [429, 429, 200]

    post(metadata_server, "faults", json={"garbage": True, "drop_flavor": True, "not_found": ["instance/zone"]})
    garbage = get(metadata_server, "instance/preempted")
    assert garbage.status_code == 200 and garbage.text not in ("TRUE", "FALSE")
    assert "Metadata-Flavor" not in garbage.headers
    assert get(metadata_server, "instance/zone").status_code == 404

    post(metadata_server, "faults", json={"clear": True, "delay": 0.5})
    started = time.monotonic()
    assert get(metadata_server, "instance/preempted").text == "FALSE"
    assert time.monotonic() - started >= 0.5
    assert post(metadata_server, "faults", json={"delay": 0}).json()["faults"]["delay"] == 0

    unknown = post(metadata_server, "faults", json={"explode": True})
    assert unknown.status_code == 400 and "explode" in unknown.text
    assert post(metadata_server, "faults", data="not json").status_code == 400


def test_faults_from_python(metadata_server):
    metadata_server.fail_next(1)
    assert get(metadata_server, "instance/preempted").status_code == 503
    before = metadata_server.request_count
    get(metadata_server, "instance/preempted")
    assert metadata_server.request_count == before + 1
    assert metadata_server.requests_for("instance/preempted") == 2


def test_google_auth_accepts_the_drill(metadata_server):
    """google-auth (what google-cloud-storage uses on a VM) detects it and gets project, email and a token."""
    code = (
        "import google.auth.transport.requests as tr, google.auth.compute_engine._metadata as m\n"
        "from google.auth import compute_engine\n"
        "r = tr.Request()\n"
        "creds = compute_engine.Credentials(); creds.refresh(r)\n"
        "print(m.ping(r), m.get_project_id(r), creds.service_account_email, creds.token)\n"
    )
    env = {**os.environ, "GCE_METADATA_HOST": metadata_server.host_port, "GCE_METADATA_IP": metadata_server.host_port}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "True", "drill-project", "spotrunner-drill@drill-project.iam.gserviceaccount.com", "drill-token"]


def test_serve_runs_until_sigterm_and_flips_preemption():
    code = "import sys; from spotrunner.drill import serve; sys.exit(serve(0, {'spotrunner-run-id': 'drill-7'}))"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        export = wait_for(lambda: next((l for l in lines if l.startswith("export GCE_METADATA_HOST=")), None),
                          15, "the export line")
        curl = wait_for(lambda: next((l for l in lines if l.startswith("curl ")), None), 5, "the curl line")
        host = export.strip().split("=", 1)[1]
        base = f"http://{host}/computeMetadata/v1/"
        assert requests.get(base + "instance/preempted", headers=FLAVOR, timeout=5).text == "FALSE"
        assert requests.get(base + "instance/attributes/spotrunner-run-id", headers=FLAVOR, timeout=5).text == "drill-7"
        # Run the printed command's request: curl -X POST URL
        assert curl.split()[:3] == ["curl", "-X", "POST"]
        assert requests.post(curl.split()[3], timeout=5).status_code == 200
        assert requests.get(base + "instance/preempted", headers=FLAVOR, timeout=5).text == "TRUE"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_serve_refuses_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}"):
            serve(port, {})
