"""The systemd deployment in deploy/: the unit contract, the example config, and systemd's own checks."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dispatcher.contract.config import DaemonConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVICE = DEPLOY / "dispatcher.service"
SOCKET = DEPLOY / "dispatcher.socket"
EXAMPLE_CONFIG = DEPLOY / "config.example.toml"
SYSUSERS = DEPLOY / "sysusers.d" / "dispatcher.conf"

SEED_PROVIDERS = {"zhipu", "hunyuan", "nvidia1", "nvidia2", "siliconflow"}
TASK_CLASSES = {"realtime", "bulk", "complex", "default"}
MAX_EXPOSURE = 2.0

# What API keys look like: vendor prefixes, or a long unbroken run of key alphabet.
KEY_MATERIAL = re.compile(r"\b(?:sk|nvapi)-[A-Za-z0-9_-]{8,}|[A-Za-z0-9]{32,}")


class _MultiValueSection(dict[str, Any]):
    """A section that keeps every value of a repeated key, as systemd does.

    configparser stores each option line as a list before joining the lines of
    a value with newlines, so extending the list on a repeated key yields all
    values newline-separated; `unit_values` splits them again.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and isinstance(self.get(key), list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def read_unit(path: Path) -> configparser.RawConfigParser:
    """Parse a unit file with configparser: case-sensitive keys, repeated keys kept."""
    parser = configparser.RawConfigParser(
        strict=False,
        dict_type=_MultiValueSection,
        comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return parser


def unit_values(unit: configparser.RawConfigParser, section: str, key: str) -> list[str]:
    """Every value given to `key` in `section`, in file order ([] when absent)."""
    if not unit.has_option(section, key):
        return []
    return unit.get(section, key).split("\n")


def unit_value(unit: configparser.RawConfigParser, section: str, key: str) -> str:
    """The effective (last) value of `key` in `section`."""
    values = unit_values(unit, section, key)
    assert values, f"{section}.{key} is not set"
    return values[-1]


@pytest.fixture(scope="module")
def service() -> configparser.RawConfigParser:
    """deploy/dispatcher.service, parsed."""
    return read_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> configparser.RawConfigParser:
    """deploy/dispatcher.socket, parsed."""
    return read_unit(SOCKET)


@pytest.fixture(scope="module")
def example_config() -> dict[str, Any]:
    """deploy/config.example.toml, parsed."""
    return tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))


def credential_names(unit: configparser.RawConfigParser, key: str) -> list[str]:
    """The credential IDs named by LoadCredential= or SetCredential= lines."""
    return [value.partition(":")[0] for value in unit_values(unit, "Service", key)]


# The unit contract (always runs)


def test_service_type_is_notify(service: configparser.RawConfigParser) -> None:
    """The service reports readiness itself (Type=notify or notify-reload), main process only."""
    assert unit_value(service, "Service", "Type") in {"notify", "notify-reload"}
    assert unit_value(service, "Service", "NotifyAccess") == "main"


def test_service_reload_sends_sighup(service: configparser.RawConfigParser) -> None:
    """With Type=notify, systemctl reload sends SIGHUP to the main process."""
    if unit_value(service, "Service", "Type") == "notify-reload":
        pytest.skip("Type=notify-reload sends SIGHUP itself")
    assert unit_value(service, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_service_has_watchdog(service: configparser.RawConfigParser) -> None:
    """WatchdogSec is set to a positive number of seconds."""
    assert int(unit_value(service, "Service", "WatchdogSec")) > 0


def test_service_runs_serve_with_system_config(service: configparser.RawConfigParser) -> None:
    """ExecStart runs `dispatcher serve --config /etc/dispatcher/config.toml` from the venv."""
    assert unit_value(service, "Service", "ExecStart") == (
        "/opt/dispatcher/venv/bin/dispatcher serve --config /etc/dispatcher/config.toml"
    )


def test_service_runs_unprivileged(service: configparser.RawConfigParser) -> None:
    """The daemon runs as user dispatcher with no capabilities."""
    assert unit_value(service, "Service", "User") == "dispatcher"
    assert unit_value(service, "Service", "CapabilityBoundingSet") == ""


def test_service_socket_group_is_clients(service: configparser.RawConfigParser) -> None:
    """The daemon's group is dispatcher-clients, so the socket it creates is theirs."""
    groups = (
        unit_values(service, "Service", "Group")
        + " ".join(unit_values(service, "Service", "SupplementaryGroups")).split()
    )
    assert "dispatcher-clients" in groups


def test_socket_is_group_only(socket_unit: configparser.RawConfigParser) -> None:
    """The activation socket is mode 0660, owned by group dispatcher-clients."""
    assert unit_value(socket_unit, "Socket", "SocketMode") == "0660"
    assert unit_value(socket_unit, "Socket", "SocketGroup") == "dispatcher-clients"


def test_socket_path_matches_runtime_directory(
    service: configparser.RawConfigParser, socket_unit: configparser.RawConfigParser
) -> None:
    """The socket unit listens inside the service's RuntimeDirectory."""
    runtime = unit_value(service, "Service", "RuntimeDirectory")
    listen = unit_value(socket_unit, "Socket", "ListenStream")
    assert listen == f"/run/{runtime}/dispatcher.sock"


def test_socket_activates_the_service(socket_unit: configparser.RawConfigParser) -> None:
    """The socket unit hands its connections to dispatcher.service."""
    assert unit_value(socket_unit, "Socket", "Service") == "dispatcher.service"


def test_service_loads_every_seed_key(service: configparser.RawConfigParser) -> None:
    """A LoadCredential= line exists for each of the five providers' keys."""
    assert set(credential_names(service, "LoadCredential")) == {
        f"{name}.key" for name in SEED_PROVIDERS
    }


def test_service_credentials_come_from_files(service: configparser.RawConfigParser) -> None:
    """Every LoadCredential= reads a root-only file under /etc/dispatcher/keys."""
    for value in unit_values(service, "Service", "LoadCredential"):
        name, _, path = value.partition(":")
        assert path == f"/etc/dispatcher/keys/{name}"


def test_service_credential_fallbacks_are_blank(service: configparser.RawConfigParser) -> None:
    """Each key has a blank SetCredential= fallback, so a missing key disables one provider only."""
    fallbacks = dict(
        v.partition(":")[::2] for v in unit_values(service, "Service", "SetCredential")
    )
    assert fallbacks == dict.fromkeys(credential_names(service, "LoadCredential"), r"\n")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.is_file()),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_no_key_material_in_deploy(path: Path) -> None:
    """No file in deploy/ contains anything shaped like an API key."""
    assert KEY_MATERIAL.findall(path.read_text(encoding="utf-8")) == []


def test_sysusers_creates_user_and_group() -> None:
    """sysusers.d creates group dispatcher-clients and user dispatcher in it."""
    lines = [
        line.split()
        for line in SYSUSERS.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["g", "dispatcher-clients", "-"] in lines
    assert any(fields[:3] == ["u", "dispatcher", "-:dispatcher-clients"] for fields in lines)


# The example configuration


def test_example_config_has_seed_providers(example_config: dict[str, Any]) -> None:
    """The example configures exactly the five SEED.md providers."""
    assert set(example_config["providers"]) == SEED_PROVIDERS


def test_example_config_has_task_classes(example_config: dict[str, Any]) -> None:
    """The example routes the four task classes."""
    assert set(example_config["classes"]) == TASK_CLASSES


def test_example_config_keys_are_credentials(
    example_config: dict[str, Any], service: configparser.RawConfigParser
) -> None:
    """Every provider's key is a file in $CREDENTIALS_DIRECTORY that the unit loads."""
    loaded = set(credential_names(service, "LoadCredential"))
    for name, provider in example_config["providers"].items():
        assert provider["api_key_file"] == f"${{CREDENTIALS_DIRECTORY}}/{name}.key"
        assert f"{name}.key" in loaded


def test_example_config_has_no_key_literals(example_config: dict[str, Any]) -> None:
    """No provider carries a key inline; only api_key_file or api_key_env name one."""
    for provider in example_config["providers"].values():
        assert {k for k in provider if "key" in k} <= {"api_key_file", "api_key_env"}


def test_example_config_socket_matches_unit(
    example_config: dict[str, Any], socket_unit: configparser.RawConfigParser
) -> None:
    """The daemon's socket path and mode are the socket unit's."""
    daemon = example_config["daemon"]
    assert daemon["socket"] == unit_value(socket_unit, "Socket", "ListenStream")
    assert daemon["socket_mode"] == unit_value(socket_unit, "Socket", "SocketMode")


def test_example_config_loads() -> None:
    """The daemon's own loader accepts the example configuration."""
    config = pytest.importorskip("dispatcher.contract.config")
    loaded = config.load_config(EXAMPLE_CONFIG)
    assert set(loaded.providers) == SEED_PROVIDERS


# systemd's own checks (when systemd-analyze is installed)


def systemd_analyze() -> str:
    """Path of systemd-analyze with --offline support, or skip the test."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed; the unit contract tests still ran")
    version = subprocess.run(
        [path, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = re.match(r"systemd (\d+)", version)
    if match is None or int(match[1]) < 250:
        pytest.skip(f"systemd-analyze is older than 250 (no --offline): {version.splitlines()[0]}")
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze without colours or a pager."""
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [systemd_analyze(), "--no-pager", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
def runnable_units(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the units whose ExecStart binary exists on this machine."""
    true = shutil.which("true")
    assert true is not None
    service = tmp_path / SERVICE.name
    text = SERVICE.read_text(encoding="utf-8")
    service.write_text(
        text.replace("ExecStart=/opt/dispatcher/venv/bin/dispatcher ", f"ExecStart={true} "),
        encoding="utf-8",
    )
    socket = tmp_path / SOCKET.name
    shutil.copy(SOCKET, socket)
    return service, socket


def test_systemd_analyze_verify_passes(runnable_units: tuple[Path, Path]) -> None:
    """systemd-analyze verify accepts both units without a warning about them."""
    result = run_analyze("verify", "--man=no", *map(str, runnable_units))
    complaints = [line for line in result.stderr.splitlines() if "dispatcher" in line]
    assert (result.returncode, complaints) == (0, [])


def test_systemd_analyze_security_exposure(runnable_units: tuple[Path, Path]) -> None:
    """systemd-analyze security rates the service's exposure at most 2.0."""
    service, _ = runnable_units
    result = run_analyze("security", "--offline=yes", str(service))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE


def test_service_descriptors_leave_room_above_the_connection_cap(
    service: configparser.RawConfigParser,
) -> None:
    """LimitNOFILE is set well above daemon.max_connections, so accept never hits EMFILE first."""
    limit = int(unit_value(service, "Service", "LimitNOFILE"))
    assert limit >= 2 * DaemonConfig().max_connections


def test_service_files_are_private(service: configparser.RawConfigParser) -> None:
    """The daemon's files (the journal's WAL holds prompts) are created for its user alone."""
    assert int(unit_value(service, "Service", "UMask"), 8) & 0o077 == 0o077
