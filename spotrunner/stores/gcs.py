"""A store in Google Cloud Storage: `gs://BUCKET[/PREFIX]/<run-id>/<key>`.

Everything goes through google-cloud-storage: its retry policy (bounded by our own
deadlines, never the client's 120 s default), its crc32c checks on upload and download,
and generation preconditions for creates (`if_generation_match=0`) and compare-and-swap
replaces. The client is built lazily, once per store, from Application Default
Credentials; with `STORAGE_EMULATOR_HOST` set it talks to the emulator anonymously.
Credentials are never logged or put in a message.
"""

from __future__ import annotations

import base64
import os
import threading
from typing import Any, Callable, TypeVar

import google_crc32c
import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from spotrunner.errors import ConfigError, CorruptCheckpoint, NotFound, PreconditionFailed, StoreError
from spotrunner.stores import Generation, split_gcs_url

T = TypeVar("T")

# Without a caller's deadline: long enough to ride out a short GCS hiccup, far shorter than
# the client's own 120 s retry / 60 s request defaults, which would outlast a preemption.
DEFAULT_DEADLINE = 60.0
DEFAULT_REQUEST_TIMEOUT = 30.0
# Listing and metadata calls at startup (check_access) should fail fast enough to be useful.
ACCESS_CHECK_DEADLINE = 30.0
_PLACEHOLDER_PROJECT = "spotrunner-local"
_CONTENT_TYPE = "application/octet-stream"
_OBJECT_USER_ROLE = "roles/storage.objectUser"
_METADATA_EMAIL_PATH = "instance/service-accounts/default/email"


def _crc32c_b64(data: bytes) -> str:
    """The object's crc32c as GCS reports it: base64 of the big-endian 32-bit value."""
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _one_line(exc: BaseException) -> str:
    """A short, single-line description of a client exception (no JSON bodies, no tracebacks)."""
    if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
        return f"retries exhausted, last error: {_one_line(exc.cause)}"
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        # Its message carries the URL and the JSON error body; the status says enough.
        return f"HTTP {exc.code} {type(exc).__name__}" if exc.code else type(exc).__name__
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) is not None:  # the media layer's InvalidResponse
        return f"HTTP {response.status_code} from the download/upload endpoint"
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if len(message) > 200:
        message = message[:200] + "…"
    return f"{type(exc).__name__}: {message}"


def _create_client(project: str | None = None) -> Any:
    """A storage client: anonymous against the emulator, Application Default Credentials otherwise."""
    from google.cloud import storage

    # Since 3.17 the client fetches each bucket's metadata in a background thread, for trace
    # labels only. roles/storage.objectUser cannot read bucket metadata (a 403 every start),
    # and an extra request racing the emergency checkpoint buys nothing: opt out.
    os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The client switches to anonymous credentials by itself; it only needs a project name.
        return storage.Client(project=project or os.environ.get("GOOGLE_CLOUD_PROJECT") or _PLACEHOLDER_PROJECT)
    try:
        return storage.Client(project=project)
    except auth_exceptions.DefaultCredentialsError:
        raise ConfigError(
            "no Google credentials found for the gs:// store; on GCE attach a service account to the VM, "
            "elsewhere run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


def _retry(deadline: float | None) -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(DEFAULT_DEADLINE if deadline is None else max(0.1, float(deadline)))


def _timeout(deadline: float | None) -> float:
    """The per-request timeout: never longer than the whole call may take."""
    if deadline is None:
        return DEFAULT_REQUEST_TIMEOUT
    return max(0.1, min(float(deadline), DEFAULT_REQUEST_TIMEOUT))


class GCSStore:
    """The run `run_id` under `gs://BUCKET[/PREFIX]`; implements spotrunner.stores.Store."""

    def __init__(self, url: str, run_id: str):
        if not run_id or "/" in run_id:
            raise ConfigError(f"run id {run_id!r} must be non-empty and contain no '/'")
        self.bucket_name, prefix = split_gcs_url(url)
        self.run_id = run_id
        self._root = f"{prefix}/{run_id}" if prefix else run_id
        self.url = f"gs://{self.bucket_name}/{self._root}"
        self._client: Any = None
        self._bucket: Any = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GCSStore({self.url!r})"

    # -- plumbing -------------------------------------------------------------------------

    def _get_bucket(self) -> Any:
        with self._client_lock:
            if self._bucket is None:
                self._client = _create_client()
                self._bucket = self._client.bucket(self.bucket_name)
            return self._bucket

    def _name(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad store key {key!r}")
        return f"{self._root}/{key}"

    def _blob(self, key: str) -> Any:
        return self._get_bucket().blob(self._name(key))

    def _key_url(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _call(self, action: str, key: str, fn: Callable[[], T]) -> T:
        """Run one client call, turning its failures into spotrunner errors with one-line messages."""
        where = self._key_url(key)
        try:
            return fn()
        except (StoreError, ConfigError):
            raise
        except api_exceptions.NotFound:
            raise NotFound(f"{where} does not exist") from None
        except api_exceptions.PreconditionFailed:
            raise PreconditionFailed(f"{where}: precondition failed (the object exists or changed)") from None
        except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as exc:
            raise StoreError(
                f"cannot {action} {where}: access denied ({_one_line(exc)}); "
                f"grant {_OBJECT_USER_ROLE} on gs://{self.bucket_name}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - every client failure must become one line
            from google.cloud.storage.exceptions import DataCorruption

            if isinstance(exc, DataCorruption):
                raise CorruptCheckpoint(f"{where}: download failed its crc32c check (torn or corrupt object)") from None
            if isinstance(exc, (api_exceptions.GoogleAPICallError, api_exceptions.RetryError,
                                auth_exceptions.GoogleAuthError, requests.RequestException, OSError)):
                raise StoreError(f"cannot {action} {where}: {_one_line(exc)}") from None
            raise

    # -- the Store protocol ---------------------------------------------------------------

    def _download(self, key: str, deadline: float | None) -> tuple[bytes, Generation]:
        blob = self._blob(key)

        def download() -> bytes:
            # A single, whole-object request: the client checks the crc32c the server sent
            # (chunked or ranged downloads would go unchecked).
            return blob.download_as_bytes(checksum="crc32c", timeout=_timeout(deadline), retry=_retry(deadline))

        data = self._call("read", key, download)
        generation = blob.generation
        return data, int(generation) if generation is not None else 0

    def read(self, key: str, *, deadline: float | None = None) -> bytes:
        """The object's bytes, crc32c-verified; NotFound if absent, CorruptCheckpoint if torn."""
        return self._download(key, deadline)[0]

    def read_versioned(self, key: str, *, deadline: float | None = None) -> tuple[bytes, Generation]:
        """The object's bytes and generation (both from the same response); NotFound if absent."""
        return self._download(key, deadline)

    def create(self, key: str, data: bytes, *, deadline: float | None = None) -> None:
        """Create an immutable object; a retried create that finds its own bytes succeeds."""
        blob = self._blob(key)

        def upload() -> None:
            # Objects over 8 MiB go up as a resumable upload (the client's own threshold). The
            # emulator ignores preconditions there, real GCS does not; either way checkpoint blob
            # names carry a random nonce, so two writers never race for one large name.
            blob.upload_from_string(
                data, content_type=_CONTENT_TYPE, if_generation_match=0, checksum="crc32c",
                timeout=_timeout(deadline), retry=_retry(deadline),
            )

        try:
            self._call("create", key, upload)
        except PreconditionFailed:
            # Either someone else's object, or ours: a retry after a success reply was lost.
            existing = self._call("inspect", key, lambda: self._get_bucket().get_blob(
                self._name(key), timeout=_timeout(deadline), retry=_retry(deadline)))
            if existing is not None and existing.size == len(data) and existing.crc32c == _crc32c_b64(data):
                return
            raise PreconditionFailed(f"{self._key_url(key)} already exists with other contents") from None

    def replace(self, key: str, data: bytes, *, if_generation: Generation | None,
                deadline: float | None = None) -> Generation:
        """Compare-and-swap on the object's generation (None: must be absent); the new generation."""
        blob = self._blob(key)
        expected = 0 if if_generation is None else int(if_generation)

        def upload() -> None:
            blob.upload_from_string(
                data, content_type=_CONTENT_TYPE, if_generation_match=expected, checksum="crc32c",
                timeout=_timeout(deadline), retry=_retry(deadline),
            )

        try:
            self._call("replace", key, upload)
        except PreconditionFailed:
            raise PreconditionFailed(
                f"{self._key_url(key)} changed since it was read (expected generation {expected})"
            ) from None
        except NotFound:
            # A 404 on an upload means the bucket is gone, not the object.
            raise StoreError(f"cannot replace {self._key_url(key)}: bucket {self.bucket_name} does not exist") from None
        return int(blob.generation)

    def put(self, key: str, data: bytes, *, deadline: float | None = None) -> None:
        """Overwrite unconditionally (records only one writer updates)."""
        blob = self._blob(key)

        def upload() -> None:
            blob.upload_from_string(
                data, content_type=_CONTENT_TYPE, checksum="crc32c",
                timeout=_timeout(deadline), retry=_retry(deadline),
            )

        try:
            self._call("write", key, upload)
        except NotFound:
            raise StoreError(f"cannot write {self._key_url(key)}: bucket {self.bucket_name} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, relative to the run root, sorted."""
        bucket = self._get_bucket()
        start = len(self._root) + 1

        def names() -> list[str]:
            blobs = bucket.client.list_blobs(
                bucket, prefix=f"{self._root}/{prefix}", timeout=DEFAULT_REQUEST_TIMEOUT, retry=_retry(None),
            )
            return [blob.name[start:] for blob in blobs]

        return sorted(self._call("list", prefix, names))

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""
        blob = self._blob(key)
        try:
            self._call("delete", key, lambda: blob.delete(timeout=DEFAULT_REQUEST_TIMEOUT, retry=_retry(None)))
        except NotFound:
            pass

    def check_access(self) -> None:
        """Raise ConfigError (one line: what and how to fix) unless this run's root can be listed and written."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        bucket = self._get_bucket()
        retry = DEFAULT_RETRY.with_deadline(ACCESS_CHECK_DEADLINE)
        timeout = min(DEFAULT_REQUEST_TIMEOUT, ACCESS_CHECK_DEADLINE)
        probe = bucket.blob(f"{self._root}/.access-check-{os.urandom(6).hex()}")

        def list_and_write() -> None:
            # objects.list, create and delete are what a run needs; roles/storage.objectUser
            # grants them but not storage.buckets.get, so the bucket's metadata is not read.
            list(bucket.client.list_blobs(bucket, prefix=f"{self._root}/", max_results=1,
                                          timeout=timeout, retry=retry))
            probe.upload_from_string(b"", content_type=_CONTENT_TYPE, if_generation_match=0,
                                     timeout=timeout, retry=retry)
            probe.delete(timeout=timeout, retry=retry)

        try:
            list_and_write()
        except api_exceptions.NotFound:
            raise _missing_bucket(self.url, self.bucket_name) from None
        except (api_exceptions.Forbidden, api_exceptions.Unauthorized):
            raise ConfigError(self._access_denied_message()) from None
        except auth_exceptions.RefreshError as exc:
            raise ConfigError(
                f"--store {self.url}: the Google credentials in use could not be refreshed ({_one_line(exc)}); "
                "check the VM's service account or rerun `gcloud auth application-default login`"
            ) from None
        except Exception as exc:  # noqa: BLE001 - an unreachable store is a failure, not a config error
            if isinstance(exc, (api_exceptions.GoogleAPICallError, api_exceptions.RetryError,
                                auth_exceptions.GoogleAuthError, requests.RequestException, OSError)):
                raise StoreError(f"cannot reach {self.url}: {_one_line(exc)}") from None
            raise

    def _access_denied_message(self) -> str:
        principal = self._principal()
        if principal:
            kind = "serviceAccount" if principal.endswith(".gserviceaccount.com") else "user"
            member = f"{kind}:{principal}"
            who = principal
        else:
            member = "PRINCIPAL"
            who = "the credentials in use"
        return (
            f"--store {self.url}: access denied to bucket {self.bucket_name} for {who}; it needs "
            f"{_OBJECT_USER_ROLE} on the bucket: gcloud storage buckets add-iam-policy-binding "
            f"gs://{self.bucket_name} --member={member} --role={_OBJECT_USER_ROLE}"
        )

    def _principal(self) -> str | None:
        """The e-mail the requests ran as, when the credentials or the metadata server say."""
        credentials = getattr(self._client, "_credentials", None)
        email = getattr(credentials, "service_account_email", None)
        if isinstance(email, str) and "@" in email:
            return email
        try:
            from google.auth import compute_engine
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(credentials, compute_engine.Credentials):
            return None
        # On GCE the credentials say only "default" until refreshed; ask the metadata server.
        host = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_ROOT") or "metadata.google.internal"
        try:
            response = requests.get(
                f"http://{host}/computeMetadata/v1/{_METADATA_EMAIL_PATH}",
                headers={"Metadata-Flavor": "Google"}, timeout=2,
            )
        except requests.RequestException:
            return None
        text = response.text.strip()
        return text if response.status_code == 200 and "@" in text else None


def _missing_bucket(url: str, bucket_name: str) -> ConfigError:
    return ConfigError(f"--store {url}: bucket {bucket_name} does not exist; create it: "
                       f"gcloud storage buckets create gs://{bucket_name} --location=REGION")


def list_run_ids(url: str) -> list[str]:
    """Run ids directly under `gs://BUCKET[/PREFIX]` (the first path segment below it), sorted."""
    bucket_name, prefix = split_gcs_url(url)
    client = _create_client()
    base = f"{prefix}/" if prefix else ""

    try:
        iterator = client.list_blobs(bucket_name, prefix=base, delimiter="/",
                                     timeout=DEFAULT_REQUEST_TIMEOUT, retry=_retry(None))
        for _page in iterator.pages:
            pass
        prefixes = iterator.prefixes
    except api_exceptions.NotFound:
        raise _missing_bucket(url, bucket_name) from None
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized):
        raise ConfigError(
            f"--store {url}: access denied to bucket {bucket_name}; it needs {_OBJECT_USER_ROLE} on the bucket"
        ) from None
    except (api_exceptions.GoogleAPICallError, api_exceptions.RetryError, auth_exceptions.GoogleAuthError,
            requests.RequestException, OSError) as exc:
        raise StoreError(f"cannot list {url}: {_one_line(exc)}") from None
    return sorted(p[len(base):].rstrip("/") for p in prefixes if p[len(base):].rstrip("/"))
