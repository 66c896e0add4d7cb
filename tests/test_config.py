"""Configuration: layering and one-line errors that name the setting and the fix (exit 78)."""

import os
import subprocess
import sys

import pytest

from spotrunner import config, exitcodes
from spotrunner.errors import ConfigError
from tests.support.processes import REPO


def test_layers_override_in_order(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 7\nbatch-size = 64\nlr = 0.01\nseed = 3\n')
    cfg = config.load(
        {"seed": "9"},
        config_file=str(toml),
        environ={"SPOTRUNNER_BATCH_SIZE": "32", "SPOTRUNNER_LR": "0.5", "UNRELATED": "x"},
        metadata_attributes=lambda: {"spotrunner-run-id": "from-metadata", "spotrunner-config": "epochs = 2\nkeep = 4"},
    )
    assert (cfg.run_id, cfg.keep, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed) == ("from-metadata", 4, 7, 32, 0.5, 9)


def test_config_round_trips_through_json():
    cfg = config.load({"epochs": "3", "takeover": True}, environ={})
    assert config.Config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("flags, environ, toml, expected", [
    ({"epochs": "-1"}, {}, None, "--epochs=-1 is invalid: must be at least 1"),
    ({"dataset": "imagenet"}, {}, None, "--dataset='imagenet' is invalid: choose one of cifar10, synthetic"),
    ({"store": "s3://bucket/x"}, {}, None, "unsupported scheme 's3'"),
    ({"store": "gs://"}, {}, None, "names no bucket"),
    ({"store": "gs://Bad_Bucket!"}, {}, None, "not a valid bucket name"),
    ({"keep": "1"}, {}, None, "--keep=1 is invalid: must be at least 2"),
    ({"lr": "fast"}, {}, None, "--lr could not convert"),
    ({}, {"SPOTRUNNER_EPOCS": "3"}, None, "environment SPOTRUNNER_EPOCS: unknown setting 'epocs'"),
    ({}, {}, "epocs = 3\n", "unknown setting 'epocs'"),
    ({}, {}, "epochs = \n", "not valid TOML"),
    ({}, {}, "epochs = 2.5\n", "--epochs 2.5 is not a whole number"),
    ({"run_id": "../escape"}, {}, None, "--run-id='../escape' is invalid"),
])
def test_bad_values_raise_one_line_errors(tmp_path, flags, environ, toml, expected):
    config_file = None
    if toml is not None:
        config_file = str(tmp_path / "bad.toml")
        open(config_file, "w").write(toml)
    with pytest.raises(ConfigError) as error:
        config.load(flags, config_file=config_file, environ=environ)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_malformed_metadata_attribute_names_the_attribute():
    with pytest.raises(ConfigError, match="metadata attribute spotrunner-config: not valid TOML"):
        config.load({}, environ={}, metadata_attributes=lambda: {"spotrunner-config": "epochs = = 2"})
    with pytest.raises(ConfigError, match="metadata attribute spotrunner-run-id"):
        config.load({}, environ={}, metadata_attributes=lambda: {"spotrunner-run-id": "has space"})


def _run_cli(*args, user=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTRUNNER_")}
    return subprocess.run([sys.executable, "-m", "spotrunner", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=60, user=user)


@pytest.mark.parametrize("args, expected", [
    (["run", "--epochs", "-3", "--metadata", "off"], "--epochs=-3 is invalid: must be at least 1"),
    (["run", "--dataset", "mnist", "--metadata", "off"], "choose one of cifar10, synthetic"),
    (["run", "--store", "gs:/oops", "--metadata", "off"], "--store"),
    (["run", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["run", "--config", "/nonexistent/run.toml"], "--config /nonexistent/run.toml: cannot read it"),
    (["run", "--store", "/etc/hostname/runs", "--metadata", "off"], "is not a directory"),
])
def test_cli_config_errors_exit_78_with_one_line(args, expected):
    result = _run_cli(*args)
    assert result.returncode == exitcodes.CONFIG, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_non_writable_store_exits_78(tmp_path):
    store = tmp_path / "readonly"
    store.mkdir()
    # Root may write anywhere, except on a read-only filesystem.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(store)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = _run_cli("run", "--store", str(store / "runs"), "--metadata", "off", "--dataset", "synthetic")
    finally:
        subprocess.run(["umount", str(store)], check=True)
    assert result.returncode == exitcodes.CONFIG, result.stderr
    assert "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
