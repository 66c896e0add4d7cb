"""The `spotrunner` command line: run, status, checkpoints, report, simulate-metadata.

Every error an operator can cause ends in one line on stderr and a defined exit code
(78 for configuration, see exitcodes.py), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

from spotrunner import __version__, exitcodes
from spotrunner import config as config_module
from spotrunner.errors import ConfigError, SpotrunnerError
from spotrunner.logs import configure, get_logger

log = get_logger()

# Flags DESIGN.md fixes, in its order; every other setting is a flag too (see --help).
_RUN_FLAGS_FIRST = ("store", "run_id", "dataset", "data_dir", "synthetic_size", "epochs", "batch_size", "lr",
                    "seed", "device", "checkpoint_interval", "keep", "stop_deadline", "metadata", "takeover",
                    "nproc_per_node", "nnodes", "node_rank", "master_addr")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a configuration error (exit 78), in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exitcodes.CONFIG, f"spotrunner: {message}; see `{self.prog} --help`\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (keys as the flags, - or _)")
    names = list(_RUN_FLAGS_FIRST) + [n for n, _, _ in config_module.describe() if n not in _RUN_FLAGS_FIRST]
    described = {name: (default, text) for name, default, text in config_module.describe()}
    for name in names:
        default, text = described[name]
        if isinstance(default, bool):
            parser.add_argument(_flag(name), dest=name, action="store_const", const=True, default=None,
                                help=f"{text}")
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar=name.upper(),
                                help=f"{text} (default: {default})")


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="gs://BUCKET[/PREFIX] or a local directory (default ./runs)")
    parser.add_argument("--run-id", dest="run_id", default=None, help="the run (default: default)")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spotrunner", description="Preemption-aware training on Spot VMs.")
    parser.add_argument("--version", action="version", version=f"spotrunner {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="train (or resume) the run, stopping safely on preemption")
    _add_run_flags(run)
    status = commands.add_parser("status", help="progress, checkpoints, sessions and preemptions of a run")
    _add_store_flags(status)
    status.add_argument("--json", action="store_true", help="one JSON object (fields in DESIGN.md)")
    status.add_argument("--watch", action="store_true", help="refresh in place on a terminal")
    checkpoints = commands.add_parser("checkpoints", help="list the run's committed checkpoints")
    _add_store_flags(checkpoints)
    checkpoints.add_argument("--verify", action="store_true", help="download and verify every checkpoint")
    report = commands.add_parser("report", help="HTML/Markdown report: timeline, cost, performance")
    _add_store_flags(report)
    report.add_argument("--out", default="report", help="output directory (default ./report)")
    report.add_argument("--prices", default=None, metavar="FILE", help="price table overriding the bundled one")
    drill = commands.add_parser("simulate-metadata", help="local metadata server for preemption drills")
    drill.add_argument("--port", type=int, default=8089, help="port on 127.0.0.1 (default 8089)")
    drill.add_argument("--attribute", action="append", default=[], metavar="KEY=VALUE",
                       help="an instance attribute to serve, e.g. spotrunner-store=gs://b")
    return parser


METADATA_ON_PATIENCE = 30.0  # seconds


def _wait_until_available(client: Any, patience: float) -> bool:
    """True once the metadata server answers; tries for `patience` seconds (once when 0)."""
    deadline = time.monotonic() + patience
    while True:
        if client.is_available(timeout=1.0):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def _load_config(args: argparse.Namespace, flag_names: Sequence[str]) -> config_module.Config:
    """Settings from every layer; the metadata layer only when the metadata mode allows it."""
    flags = {name: getattr(args, name) for name in flag_names if getattr(args, name, None) is not None}
    cfg = config_module.load(flags, config_file=args.config)
    if cfg.metadata == "off":
        return cfg
    from spotrunner.metadata import MetadataClient

    client = MetadataClient()
    # `on` (the systemd unit's mode) waits out a metadata server that is briefly unavailable
    # at boot rather than failing a start that systemd would not retry.
    patience = METADATA_ON_PATIENCE if cfg.metadata == "on" else 0.0
    if not _wait_until_available(client, patience):
        if cfg.metadata == "on":
            raise ConfigError(f"--metadata on: no metadata server answers at {client.base_url}; "
                              "run on GCE or pass --metadata off")
        return cfg
    return config_module.load(flags, config_file=args.config, metadata_attributes=client.attributes)


def cmd_run(args: argparse.Namespace) -> int:
    names = [n for n, _, _ in config_module.describe()]
    early_format = args.log_format or os.environ.get("SPOTRUNNER_LOG_FORMAT", "auto")
    configure("supervisor", log_format=early_format if early_format in config_module.LOG_FORMATS else "auto")
    cfg = _load_config(args, names)
    configure("supervisor", cfg.run_id, log_format=cfg.log_format)

    from spotrunner import history
    from spotrunner.session import SessionRecorder
    from spotrunner.stores import open_store
    from spotrunner.supervisor import Supervisor

    store = open_store(cfg.store, cfg.run_id)
    store.check_access()
    final = history.read_final(store)
    if final is not None:
        log.info("run_already_completed", step=final.get("step"), weights_sha256=final.get("weights_sha256"),
                 hint="nothing to do; start a new --run-id to train again")
        return exitcodes.OK

    sources: list[Any] = []
    facts: dict[str, Any] = {}
    if cfg.metadata != "off":
        from spotrunner.metadata import MetadataClient
        from spotrunner.notices import GceMaintenanceSource, GcePreemptedSource

        client = MetadataClient()
        if cfg.metadata == "on" or client.is_available(timeout=1.0):
            sources = [GcePreemptedSource(client), GceMaintenanceSource(client)]
            facts = client.instance_facts()
    log.info("supervisor_started", run_id=cfg.run_id, store=store.url, watching_metadata=bool(sources),
             version=__version__)
    # Under torchrun across nodes, the rank-0 node keeps the run's history.
    session = SessionRecorder(store if cfg.node_rank == 0 else None, cfg.run_id, facts)
    return Supervisor(cfg, session=session, watcher_sources=sources).run()


def _open_for_reading(args: argparse.Namespace) -> Any:
    """(settings, store) for the commands that only read a run: read access is enough."""
    cfg = config_module.load({k: getattr(args, k) for k in ("store", "run_id") if getattr(args, k)},
                             config_file=args.config, writable_store=False)
    from spotrunner.status import open_for_reading

    return cfg, open_for_reading(cfg.store, cfg.run_id)


def cmd_status(args: argparse.Namespace) -> int:
    from spotrunner import status

    cfg, _store = _open_for_reading(args)
    return status.run(cfg.store, cfg.run_id, as_json=args.json, watch=args.watch)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from spotrunner import history

    _cfg, store = _open_for_reading(args)
    commits = history.read_commits(store)
    for record in history.read_set_aside(store):
        print(f"step {record.get('step')}: set aside as corrupt by a restore: {record.get('error')}")
    if not commits:
        print(f"no committed checkpoints under {store.url}")
        return exitcodes.OK
    bad = 0
    print(f"{'step':>10} {'epoch':>5} {'reason':<10} {'bytes':>12} {'committed (UTC)':<20} sha256")
    for record in commits:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.get("time", 0)))
        line = (f"{record['step']:>10} {record.get('epoch', ''):>5} {record.get('reason', ''):<10} "
                f"{record.get('size', 0):>12,} {when:<20} {record.get('sha256', '')[:16]}")
        if args.verify:
            from spotrunner.checkpoint import codec

            try:
                codec.decode(store.read(record["blob"]), sha256=record["sha256"], size=record["size"],
                             where=f"{store.url}/{record['blob']}")
                line += "  ok"
            except SpotrunnerError as exc:
                bad += 1
                line += f"  CORRUPT: {exc}"
        print(line)
    return exitcodes.FAILURE if bad else exitcodes.OK


def cmd_report(args: argparse.Namespace) -> int:
    from spotrunner import report

    cfg, _store = _open_for_reading(args)
    return report.run(cfg.store, cfg.run_id, args.out, args.prices)


def cmd_simulate_metadata(args: argparse.Namespace) -> int:
    from spotrunner.drill import serve

    attributes = {}
    for item in args.attribute:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--attribute {item!r}: use KEY=VALUE")
        attributes[key] = value
    return serve(args.port, attributes)


COMMANDS = {"run": cmd_run, "status": cmd_status, "checkpoints": cmd_checkpoints, "report": cmd_report,
            "simulate-metadata": cmd_simulate_metadata}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        configure("cli", log_format="console" if sys.stderr.isatty() else "json", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except SpotrunnerError as exc:
        print(f"spotrunner {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return exitcodes.ABORTED
