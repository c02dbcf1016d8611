"""`sidecar-envoy`'s command line against real Envoy's, flag for flag.

Each command line runs through real Envoy 1.40 and through sidecar-envoy
with `--mode validate` (or one of the flags that print and exit), on a
bootstrap both load. The exit statuses must be the same; where Envoy
refuses a flag or a value, sidecar-envoy says so in exactly one line that
names it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from envoyproc import envoy_binary

from proxy import envoy_cli

SIDECAR_ENVOY = Path(sys.executable).parent / "sidecar-envoy"
BOOTSTRAP = Path(__file__).parent / "bootstraps" / "valid" / "istio-sidecar.yaml"

# Istio's pilot-agent starts Envoy with this (istio/pkg/envoy/proxy.go), the log format its default.
ISTIO_LOG_FORMAT = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
PILOT_AGENT = ["-c", str(BOOTSTRAP), "--drain-time-s", "45", "--drain-strategy", "immediate",
               "--local-address-ip-version", "v4", "--file-flush-interval-msec", "1000", "--disable-hot-restart",
               "--allow-unknown-static-fields", "--log-format", ISTIO_LOG_FORMAT, "-l", "warning",
               "--component-log-level", "misc:error", "--concurrency", "2"]

GOOD = {
    "pilot-agent": PILOT_AGENT,
    "every-level": ["-c", str(BOOTSTRAP), "-l", "trace", "--component-log-level",
                    "upstream:debug,connection:info,admin:warning,main:warn,config:error,misc:critical,pool:off"],
    "config-yaml-alone": ["--config-yaml", BOOTSTRAP.read_text()],
    "config-yaml-over-file": ["-c", str(BOOTSTRAP), "--config-yaml", "node: {id: other}"],
    "no-meaning-here": ["-c", str(BOOTSTRAP), "--base-id", "7", "--restart-epoch", "3", "--parent-shutdown-time-s",
                        "5", "--service-cluster", "c", "--service-node", "n", "--service-zone", "z",
                        "--cpuset-threads", "--enable-mutex-tracing", "--stats-tag", "a:b", "--stats-tag", "c:d",
                        "--file-flush-min-size-kb", "4", "--log-stacktrace-single-entry", "--skip-deprecated-logs",
                        "--ignore-unknown-dynamic-fields", "--enable-fine-grain-logging", "--log-format-escaped"],
    "ignore-rest": ["-c", str(BOOTSTRAP), "--", "--not-a-flag"],
    "concurrency-zero": ["-c", str(BOOTSTRAP), "--concurrency", "0"],
}
BAD = {
    "unknown-flag": ["-c", str(BOOTSTRAP), "--no-such-flag"],
    "equals-form": ["--config-path=" + str(BOOTSTRAP)],
    "positional": ["-c", str(BOOTSTRAP), "extra"],
    "flag-twice": ["-c", str(BOOTSTRAP), "-l", "info", "-l", "debug"],
    "missing-value": ["-c", str(BOOTSTRAP), "--concurrency"],
    "not-a-number": ["-c", str(BOOTSTRAP), "--concurrency", "two"],
    "log-level": ["-c", str(BOOTSTRAP), "-l", "loud"],
    "log-level-case": ["-c", str(BOOTSTRAP), "-l", "WARN"],
    "component-unknown": ["-c", str(BOOTSTRAP), "--component-log-level", "nosuch:info"],
    "component-no-level": ["-c", str(BOOTSTRAP), "--component-log-level", "misc"],
    "component-bad-level": ["-c", str(BOOTSTRAP), "--component-log-level", "misc:loud"],
    "ip-version": ["-c", str(BOOTSTRAP), "--local-address-ip-version", "v5"],
    "dynamic-base-id-with-epoch": ["-c", str(BOOTSTRAP), "--use-dynamic-base-id", "--restart-epoch", "1"],
    "no-config": [],
    "missing-file": ["-c", str(BOOTSTRAP.parent / "no-such-file.yaml")],
}


def run(binary: Path, args: list[str], mode: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(binary), *(["--mode", "validate"] if mode else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def envoy() -> Path:
    return Path(envoy_binary())  # its absence fails the run


@pytest.mark.parametrize("name", GOOD)
def test_command_lines_envoy_takes(envoy, name):
    real, ours = run(envoy, GOOD[name]), run(SIDECAR_ENVOY, GOOD[name])
    assert real.returncode == 0, real.stderr[-500:]
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.endswith(" OK\n") and ours.stdout == real.stdout, (ours.stdout, real.stdout)


@pytest.mark.parametrize("name", BAD)
def test_command_lines_envoy_refuses(envoy, name):
    real, ours = run(envoy, BAD[name]), run(SIDECAR_ENVOY, BAD[name])
    assert real.returncode == 1, real.stderr[-500:]
    assert ours.returncode == real.returncode
    assert ours.stdout == ""
    lines = ours.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar-envoy: "), ours.stderr


def test_mode_is_checked_like_envoy(envoy):
    real, ours = run(envoy, ["--mode", "bogus", "-c", str(BOOTSTRAP)], mode=False), \
        run(SIDECAR_ENVOY, ["--mode", "bogus", "-c", str(BOOTSTRAP)], mode=False)
    assert (real.returncode, ours.returncode) == (1, 1)
    assert ours.stderr == "sidecar-envoy: error: unknown mode 'bogus' (see sidecar-envoy --help)\n"


def test_version_help_and_hot_restart_version(envoy):
    for args in (["--version"], ["--help"], ["--hot-restart-version", "--disable-hot-restart"]):
        real, ours = run(envoy, args, mode=False), run(SIDECAR_ENVOY, args, mode=False)
        assert real.returncode == ours.returncode == 0, args
    version = run(SIDECAR_ENVOY, ["--version"], mode=False).stdout
    assert "version: " in version and "/1.40.0/" in version  # the shape tools parse Envoy's with
    assert run(SIDECAR_ENVOY, ["--hot-restart-version"], mode=False).stdout == "disabled"
    usage = run(SIDECAR_ENVOY, ["--help"], mode=False).stdout
    real_usage = run(envoy, ["--help"], mode=False).stdout
    for flag in envoy_cli.BY_NAME:  # every flag of ours is one of Envoy's, and the other way round
        assert flag in usage and flag in real_usage, flag
    assert "[accepted; no meaning for this proxy]" in usage


def test_the_options_as_server_info_shows_them():
    config = envoy_cli.configure(envoy_cli.parse(PILOT_AGENT))
    options = config.command_line
    assert (options["drain_time"], options["drain_strategy"], options["concurrency"]) == ("45s", "Immediate", 2)
    assert (options["log_level"], options["component_log_level"], options["file_flush_interval"]) == (
        "warning", "misc:error", "1s")
    assert options["disable_hot_restart"] is True and options["allow_unknown_static_fields"] is True
    assert (config.drain_time, config.drain_strategy, config.concurrency) == (45.0, "immediate", 2)
    assert (config.log_level, config.log_pattern) == ("warning", ISTIO_LOG_FORMAT)


def test_init_only_loads_and_exits(capsys):
    """--mode init_only: the configuration is loaded and checked, nothing is bound, exit 0."""
    assert envoy_cli.main(["--mode", "init_only", "-c", str(BOOTSTRAP)]) == 0
    assert capsys.readouterr().out == ""
    assert envoy_cli.main(["--mode", "init_only", "-c", str(BOOTSTRAP), "--config-yaml", "bogus: 1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus: unknown field" in err
