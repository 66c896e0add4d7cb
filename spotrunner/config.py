"""The run's settings: one frozen object built from layered sources and validated once.

Layers, lowest to highest (DESIGN.md): defaults, GCE instance metadata attributes
(`spotrunner-store`, `spotrunner-run-id`, `spotrunner-config` holding TOML), the
`--config` TOML file, `SPOTRUNNER_<NAME>` environment variables, then flags. Every
bad value raises ConfigError with a one-line message naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from spotrunner.errors import ConfigError

DATASETS = ("cifar10", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
METADATA_MODES = ("auto", "on", "off")
LOG_FORMATS = ("auto", "json", "console")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_PREFIX = "SPOTRUNNER_"


@dataclass(frozen=True)
class Config:
    """Every setting of `spotrunner run`; see `describe()` for what each means."""

    store: str = "./runs"
    run_id: str = "default"
    model: str = "cifarnet"
    dataset: str = "cifar10"
    data_dir: str = "./data"
    synthetic_size: int = 5000
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    checkpoint_interval: float = 60.0
    keep: int = 3
    stop_deadline: float = 20.0
    metadata: str = "auto"
    takeover: bool = False
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    spill_dir: str = ""
    lease_ttl: float = 120.0
    hang_timeout: float = 600.0
    max_restarts: int = 5
    restart_window: float = 3600.0
    preemption_notice_seconds: float = 0.0
    threads: int = 0
    amp: bool = False
    channels_last: bool = False
    log_format: str = "auto"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return build({"defaults": json.loads(text)})

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


HELP = {
    "store": "gs://BUCKET[/PREFIX] or a local directory; a run lives under <store>/<run-id>/",
    "run_id": "name of the run, stable across restarts (letters, digits, . _ -)",
    "model": "model name from the registry (cifarnet)",
    "dataset": "cifar10 (downloaded to --data-dir when missing) or synthetic",
    "data_dir": "where CIFAR-10 lives or is downloaded to",
    "synthetic_size": "number of training images of the synthetic dataset",
    "epochs": "number of passes over the training set",
    "batch_size": "images per step (per process under torchrun)",
    "lr": "Adam learning rate",
    "seed": "seed of the model initialisation, sample order and augmentation",
    "device": "auto, cpu or cuda",
    "checkpoint_interval": "seconds between periodic checkpoints",
    "keep": "committed checkpoints to keep (at least 2)",
    "stop_deadline": "seconds the trainer gets to commit and exit after a stop request",
    "metadata": "watch the GCE metadata server: auto (when it answers), on, off",
    "takeover": "take the run over from another writer that still holds its lease",
    "nproc_per_node": "trainer processes per node (torchrun)",
    "nnodes": "number of nodes (torchrun)",
    "node_rank": "rank of this node (torchrun)",
    "master_addr": "address of the rank-0 node (torchrun)",
    "master_port": "port of the rank-0 node (torchrun)",
    "spill_dir": "local directory for emergency checkpoints when the store is slow "
    "(default: $STATE_DIRECTORY/spill, else none)",
    "lease_ttl": "seconds after which a silent writer's lease may be taken over",
    "hang_timeout": "seconds without trainer progress before it is restarted",
    "max_restarts": "trainer restarts allowed within --restart-window",
    "restart_window": "seconds over which --max-restarts is counted",
    "preemption_notice_seconds": "the VM's preemptionNoticeDuration; with a long notice "
    "spotrunner checkpoints at once and keeps training until the last safe moment",
    "threads": "CPU threads for torch (0: torch's default)",
    "amp": "bf16 autocast on CUDA",
    "channels_last": "channels-last memory format on CUDA",
    "log_format": "auto (console on a terminal, else JSON), json or console",
}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a raw value from `source` into the field's type, or raise ConfigError."""
    if name not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise ConfigError(f"{source}: unknown setting {name!r}; known settings: {known}")
    kind = type(getattr(Config, name))
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{value!r} is not a whole number")
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a number")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{value!r} is not a finite number")
            return number
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a string")
        return str(value)
    except ValueError as exc:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{source}: {flag} {exc}") from None


def _check(cfg: Config, origin: Mapping[str, str], *, writable_store: bool = True) -> None:
    """Validate the merged settings; `origin` names where each value came from."""

    def fail(name: str, fix: str) -> None:
        flag = "--" + name.replace("_", "-")
        where = origin.get(name, "default")
        raise ConfigError(f"{where}: {flag}={getattr(cfg, name)!r} is invalid: {fix}")

    if cfg.dataset not in DATASETS:
        fail("dataset", f"choose one of {', '.join(DATASETS)}")
    if cfg.device not in DEVICES:
        fail("device", f"choose one of {', '.join(DEVICES)}")
    if cfg.metadata not in METADATA_MODES:
        fail("metadata", f"choose one of {', '.join(METADATA_MODES)}")
    if cfg.log_format not in LOG_FORMATS:
        fail("log_format", f"choose one of {', '.join(LOG_FORMATS)}")
    if not RUN_ID_PATTERN.match(cfg.run_id):
        fail("run_id", "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    for name in ("epochs", "batch_size", "synthetic_size", "nproc_per_node", "nnodes"):
        if getattr(cfg, name) < 1:
            fail(name, "must be at least 1")
    if cfg.keep < 2:
        fail("keep", "must be at least 2 so a corrupt newest checkpoint has a fallback")
    for name in ("lr", "checkpoint_interval", "stop_deadline", "lease_ttl", "hang_timeout",
                 "restart_window"):
        if getattr(cfg, name) <= 0:
            fail(name, "must be greater than 0")
    for name in ("max_restarts", "threads", "preemption_notice_seconds", "seed"):
        if getattr(cfg, name) < 0:
            fail(name, "must not be negative")
    if not 0 <= cfg.node_rank < cfg.nnodes:
        fail("node_rank", f"must be between 0 and nnodes-1 ({cfg.nnodes - 1})")
    if not 0 < cfg.master_port < 65536:
        fail("master_port", "must be a TCP port (1-65535)")
    # Imported here: stores imports config for nothing, but keep the module graph flat.
    from spotrunner.stores import check_store_url

    try:
        check_store_url(cfg.store, writable=writable_store)
    except ConfigError as exc:
        raise ConfigError(f"{origin.get('store', 'default')}: --store: {exc}") from None
    from spotrunner.model import MODELS

    if cfg.model not in MODELS:
        fail("model", f"choose one of {', '.join(sorted(MODELS))}")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Settings from a TOML document; keys may use '-' or '_'."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc}); fix the syntax") from None
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        settings[name] = _coerce(name, value, source)
    return settings


def read_toml_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror}); pass an existing TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; pass a TOML file") from None
    return parse_toml(text, f"--config {path}")


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """SPOTRUNNER_<NAME> variables; an unknown one is an error so typos are not ignored."""
    settings = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        settings[name] = _coerce(name, value, f"environment {key}")
    return settings


def layers_from_metadata_attributes(attributes: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Layers from instance attributes `spotrunner-config` (TOML), `spotrunner-store`, `spotrunner-run-id`.

    Each attribute is its own layer so an error names the attribute to fix.
    """
    layers: dict[str, dict[str, Any]] = {}
    if "spotrunner-config" in attributes:
        source = "metadata attribute spotrunner-config"
        layers[source] = parse_toml(attributes["spotrunner-config"], source)
    for attribute, name in (("spotrunner-store", "store"), ("spotrunner-run-id", "run_id")):
        if attribute in attributes:
            source = f"metadata attribute {attribute}"
            layers[source] = {name: _coerce(name, attributes[attribute].strip(), source)}
    return layers


def build(layers: Mapping[str, Mapping[str, Any]], *, writable_store: bool = True) -> Config:
    """Merge named layers in order (later wins) into a validated Config."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, settings in layers.items():
        for name, value in settings.items():
            if value is None:
                continue
            values[name] = _coerce(name, value, source)
            origin[name] = source
    cfg = Config(**values)
    _check(cfg, origin, writable_store=writable_store)
    return cfg


def load(
    flags: Mapping[str, Any],
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    metadata_attributes: Callable[[], Mapping[str, str]] | None = None,
    writable_store: bool = True,
) -> Config:
    """The run's Config from every layer; `metadata_attributes` is called only if given."""
    environ = os.environ if environ is None else environ
    layers: dict[str, Mapping[str, Any]] = {}
    if metadata_attributes is not None:
        layers.update(layers_from_metadata_attributes(metadata_attributes()))
    if config_file:
        layers[f"--config {config_file}"] = read_toml_file(config_file)
    layers["environment"] = settings_from_env(environ)
    layers["flags"] = {name: value for name, value in flags.items() if value is not None}
    return build(layers, writable_store=writable_store)


def describe() -> list[tuple[str, Any, str]]:
    """(name, default, help) for every setting, for --help and the README."""
    return [(name, getattr(Config, name), HELP[name]) for name in _FIELDS]


def replace(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, **changes)
