"""Configuration: validation messages, the built-in table, keys, and `dispatcher check-config`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dispatcher import cli
from dispatcher.contract import config as config_module
from dispatcher.contract.config import ConfigError, ProviderConfig, load_config, resolve_key
from dispatcher.contract.protocol import Error, Result, Status
from dispatcher.testing.simulator import Behaviour
from tests.helpers import TEST_KEY, build_config, chat, fakes, provider_entry

MINIMAL_PROVIDER = """
[providers.alpha]
url = "http://127.0.0.1:9/v1/chat/completions"
model = "m"
api_key_env = "ALPHA_KEY"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dispatcher.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def log_events(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


# -- validation ----------------------------------------------------------------------


def test_unknown_top_level_key_is_rejected_with_file_and_key(tmp_path: Path) -> None:
    """A misspelt section is refused with the file, the key and what to do about it."""
    path = write(tmp_path, '[dameon]\nsocket = "/tmp/x.sock"\n')
    message = load_error(path)
    assert str(path) in message
    assert "dameon" in message
    assert "unknown key" in message


def test_unknown_daemon_key_is_rejected_with_its_dotted_path(tmp_path: Path) -> None:
    """An unknown key inside [daemon] is named with its section."""
    path = write(tmp_path, '[daemon]\nsokcet = "/tmp/x.sock"\n')
    message = load_error(path)
    assert str(path) in message
    assert "daemon.sokcet" in message


def test_wrong_type_is_rejected_with_the_expected_type(tmp_path: Path) -> None:
    """A string where a number belongs is refused naming the key and the expected type."""
    path = write(tmp_path, '[daemon]\nmax_frame_bytes = "big"\n')
    message = load_error(path)
    assert str(path) in message
    assert "daemon.max_frame_bytes" in message
    assert "int" in message


def test_out_of_range_value_is_rejected_with_the_bound(tmp_path: Path) -> None:
    """A concurrency of zero is refused saying it must be at least 1."""
    path = write(tmp_path, MINIMAL_PROVIDER + "concurrency = 0\n")
    message = load_error(path)
    assert str(path) in message
    assert "concurrency" in message
    assert ">= 1" in message


def test_wrong_type_in_a_provider_names_that_provider(tmp_path: Path) -> None:
    """A bad value inside [providers.alpha] is reported as providers.alpha.<key>."""
    path = write(tmp_path, MINIMAL_PROVIDER + 'concurrency = "five"\n')
    message = load_error(path)
    assert "providers.alpha.concurrency" in message


def test_unknown_key_in_a_provider_names_that_provider(tmp_path: Path) -> None:
    """A misspelt key inside [providers.alpha] is reported as providers.alpha.<key>."""
    path = write(tmp_path, MINIMAL_PROVIDER + "concurency = 4\n")
    message = load_error(path)
    assert "providers.alpha.concurency" in message


def test_invalid_choice_lists_the_allowed_values(tmp_path: Path) -> None:
    """kind = "image" is refused with the values kind may take."""
    path = write(tmp_path, MINIMAL_PROVIDER + 'kind = "image"\n')
    message = load_error(path)
    assert "kind" in message
    assert "chat" in message
    assert "embed" in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is refused with its path and the parser's position."""
    path = write(tmp_path, "[daemon\nsocket = 1\n")
    message = load_error(path)
    assert str(path) in message
    assert "TOML" in message


def test_missing_file_is_an_error_not_the_builtin_table(tmp_path: Path) -> None:
    """An explicit path that does not exist is refused rather than silently ignored."""
    message = load_error(tmp_path / "nope.toml")
    assert "nope.toml" in message


def test_class_naming_an_unknown_provider_is_rejected(tmp_path: Path) -> None:
    """A class that routes to a provider nobody configured is refused naming both."""
    path = write(
        tmp_path, MINIMAL_PROVIDER + '\n[classes.realtime]\nproviders = ["alpha", "ghost"]\n'
    )
    message = load_error(path)
    assert str(path) in message
    assert "classes.realtime" in message
    assert "ghost" in message
    assert "alpha" in message  # the known providers are listed


def test_key_literal_in_the_file_is_rejected(tmp_path: Path) -> None:
    """A key written into the file as api_key is an unknown key, never accepted."""
    path = write(tmp_path, MINIMAL_PROVIDER + 'api_key = "sk-literal"\n')
    message = load_error(path)
    assert "api_key" in message
    assert "unknown key" in message


# -- lookup and the built-in table ---------------------------------------------------


def test_no_file_anywhere_gives_the_builtin_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no --config, no $DISPATCHER_CONFIG and no system file, the five SEED providers are used."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    path = config_module.find_config_path(None, {})
    config = load_config(path)
    assert path is None
    assert set(config.providers) == {"zhipu", "hunyuan", "nvidia1", "nvidia2", "siliconflow"}
    assert config.classes["realtime"].providers == ["zhipu", "hunyuan", "nvidia2", "nvidia1"]
    assert config.providers["siliconflow"].kind == "embed"


def test_flag_wins_over_environment() -> None:
    """--config is used even when $DISPATCHER_CONFIG is set."""
    found = config_module.find_config_path("/a.toml", {"DISPATCHER_CONFIG": "/b.toml"})
    assert found == Path("/a.toml")


def test_environment_is_used_without_a_flag() -> None:
    """$DISPATCHER_CONFIG is used when no --config is given."""
    found = config_module.find_config_path(None, {"DISPATCHER_CONFIG": "/b.toml"})
    assert found == Path("/b.toml")


# -- keys ----------------------------------------------------------------------------


def test_api_key_file_expands_credentials_directory(tmp_path: Path) -> None:
    """api_key_file = "${CREDENTIALS_DIRECTORY}/k" reads the systemd credential, newline stripped."""
    (tmp_path / "alpha.key").write_text("file-key-0123456789\n", encoding="utf-8")
    provider = ProviderConfig(
        url="http://x/v1/chat/completions",
        model="m",
        api_key_file="${CREDENTIALS_DIRECTORY}/alpha.key",
    )
    state = resolve_key(provider, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert state.key == "file-key-0123456789"
    assert "file-key" not in repr(state)


def test_empty_key_file_disables_with_a_reason(tmp_path: Path) -> None:
    """An empty key file is no key, and the reason says the file is empty."""
    (tmp_path / "alpha.key").write_text("\n", encoding="utf-8")
    provider = ProviderConfig(
        url="http://x/v1/chat/completions", model="m", api_key_file=str(tmp_path / "alpha.key")
    )
    state = resolve_key(provider, {})
    assert state.key is None
    assert "empty" in state.masked()


@pytest.mark.anyio
async def test_daemon_sends_the_key_read_from_a_credentials_file(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A provider keyed by api_key_file gets that file's key as its bearer token."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "alpha.key").write_text("from-the-credential-file-42\n", encoding="utf-8")
    async with fakes(alpha=Behaviour(name="alpha")) as f:
        entry = provider_entry(
            f["alpha"], api_key_env=None, api_key_file="${CREDENTIALS_DIRECTORY}/alpha.key"
        )
        config = build_config({"alpha": entry})
        env = {"CREDENTIALS_DIRECTORY": str(creds)}
        async with start_daemon(config, environ=env) as running, running.client() as client:
            reply = await client.call(chat("hi"))
    assert isinstance(reply, Result)
    assert f["alpha"].stats.headers[-1]["Authorization"] == "Bearer from-the-credential-file-42"


@pytest.mark.anyio
async def test_missing_key_disables_that_provider_with_one_log_line(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """A provider whose key variable is unset is disabled with exactly one log line naming it."""
    async with fakes(alpha=Behaviour(name="alpha"), beta=Behaviour(name="beta")) as f:
        config = build_config(
            {"alpha": provider_entry(f["alpha"]), "beta": provider_entry(f["beta"])}
        )
        async with start_daemon(config, environ={"KEY_ALPHA": TEST_KEY}):
            pass
    disabled = [e for e in log_events(log_output) if e["event"] == "provider.disabled"]
    assert len(disabled) == 1
    assert disabled[0]["provider"] == "beta"
    assert "KEY_BETA" in disabled[0]["problem"]


@pytest.mark.anyio
async def test_daemon_with_a_missing_key_serves_the_other_providers(start_daemon: Any) -> None:
    """With one key missing the daemon still starts and answers through the provider it has."""
    async with fakes(alpha=Behaviour(name="alpha"), beta=Behaviour(name="beta")) as f:
        config = build_config(
            {"alpha": provider_entry(f["alpha"]), "beta": provider_entry(f["beta"])}
        )
        async with (
            start_daemon(config, environ={"KEY_ALPHA": TEST_KEY}) as running,
            running.client() as client,
        ):
            replies = [await client.call(chat(f"q{i}")) for i in range(3)]
            status = await client.call({"op": "status"})
    assert all(isinstance(r, Result) and r.provider == "alpha" for r in replies)
    assert f["beta"].stats.requests == 0
    assert isinstance(status, Status)
    assert status.providers["beta"].state == "disabled"
    assert "KEY_BETA" in (status.providers["beta"].problem or "")


@pytest.mark.anyio
async def test_pinning_a_keyless_provider_says_which_variable_to_set(start_daemon: Any) -> None:
    """A job pinned to a provider disabled for want of a key is refused naming the variable."""
    async with fakes(alpha=Behaviour(name="alpha"), beta=Behaviour(name="beta")) as f:
        config = build_config(
            {"alpha": provider_entry(f["alpha"]), "beta": provider_entry(f["beta"])}
        )
        async with (
            start_daemon(config, environ={"KEY_ALPHA": TEST_KEY}) as running,
            running.client() as client,
        ):
            reply = await client.call(chat("hi", providers=["beta"]))
    assert isinstance(reply, Error)
    assert reply.code == "no_provider"
    assert "KEY_BETA" in reply.message


# -- dispatcher check-config -----------------------------------------------------------


def check_config(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], **env: str
) -> tuple[int, str, str]:
    """Run `dispatcher check-config --config PATH` in-process; exit code, stdout, stderr."""
    for name in list(os.environ):
        if name.startswith("DISPATCHER_") or name.endswith("_API_KEY"):
            monkeypatch.delenv(name)
    for name, value in {"COLUMNS": "250", **env}.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CANARY = "canary-check-config-7f3a9e"


def test_check_config_masks_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config shows where each key comes from and its length, never the key itself."""
    path = write(tmp_path, MINIMAL_PROVIDER)
    code, out, err = check_config(path, monkeypatch, capsys, ALPHA_KEY=CANARY)
    assert code == 0, err
    assert "alpha" in out
    assert "$ALPHA_KEY" in out
    assert f"{len(CANARY)} chars" in out
    assert CANARY not in out + err


def test_check_config_reports_a_missing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config marks a provider whose key variable is unset as disabled."""
    path = write(tmp_path, MINIMAL_PROVIDER)
    _code, out, err = check_config(path, monkeypatch, capsys)
    assert "$ALPHA_KEY" in out
    assert "not set" in out
    assert "disabled" in out + err


def test_check_config_fails_on_an_invalid_file(tmp_path: Path) -> None:
    """`dispatcher check-config` exits non-zero on an invalid file and says which key is wrong."""
    path = write(tmp_path, '[daemon]\nsokcet = "/tmp/x.sock"\n')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**environ, "COLUMNS": "250"},
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "daemon.sokcet" in done.stderr
    assert str(path) in done.stderr


def test_a_key_file_with_a_second_line_disables_only_that_provider(tmp_path: Path) -> None:
    """A key file holding the key and a comment is refused at load, naming the file."""
    key_file = tmp_path / "alpha.key"
    key_file.write_text(f"{TEST_KEY}\n# rotated on monday\n", encoding="utf-8")
    provider = ProviderConfig(url="http://127.0.0.1:9", model="m", api_key_file=str(key_file))
    state = resolve_key(provider, {})
    assert state.key is None
    assert str(key_file) in state.masked()
    assert "more than one line" in state.masked()
    key_file.write_text(f"{TEST_KEY}\n", encoding="utf-8")  # a trailing newline is fine
    assert resolve_key(provider, {}).key == TEST_KEY


def test_a_key_pasted_into_api_key_env_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key written where a variable name belongs is masked in check-config and disables."""
    pasted = "sk-" + "a1b2c3d4" * 5
    path = write(tmp_path, MINIMAL_PROVIDER.replace('"ALPHA_KEY"', f'"{pasted}"'))
    _code, out, err = check_config(path, monkeypatch, capsys)
    assert pasted not in out + err
    assert "looks like a key" in out
    state = resolve_key(load_config(path).providers["alpha"], {})
    assert state.key is None
    assert pasted not in state.masked()


def test_builtin_classes_adapt_to_the_providers_that_exist(tmp_path: Path) -> None:
    """A config with only some of the seed providers loads: the classes keep what exists."""
    path = write(
        tmp_path,
        """
[providers.hunyuan]
url = "http://127.0.0.1:9/v1/chat/completions"
model = "hunyuan-lite"
[providers.nvidia2]
url = "http://127.0.0.1:9/v1/chat/completions"
model = "z-ai/glm4.7"
""",
    )
    config = load_config(path)
    assert config.classes["complex"].providers == ["nvidia2"]
    assert set(config.classes["complex"].weights) <= {"nvidia2"}
    assert config.classes["default"].providers == ["hunyuan", "nvidia2"]


def test_check_config_flags_a_world_writable_config_and_a_readable_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files other users could change or read are named, with what to do."""
    key_file = tmp_path / "alpha.key"
    key_file.write_text(TEST_KEY, encoding="utf-8")
    key_file.chmod(0o644)
    path = write(
        tmp_path,
        MINIMAL_PROVIDER.replace('api_key_env = "ALPHA_KEY"', f'api_key_file = "{key_file}"'),
    )
    path.chmod(0o666)
    _code, _out, err = check_config(path, monkeypatch, capsys)
    assert "world-writable" in err
    assert f"chmod 600 {key_file}" in err.replace("\n", "")
