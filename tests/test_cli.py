"""The command line, as a user runs it: `python -m dispatcher ...` against `serve --simulate`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from dispatcher.client.connection import answers_ping as client_answers_ping

START_DEADLINE_S = 15.0
COMMAND_TIMEOUT_S = 20.0


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that would point at a real daemon or key."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISPATCHER_") and not k.endswith("_API_KEY")
    }
    env.update(COLUMNS="200", NO_COLOR="1", **extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def answers_ping(socket: str) -> bool:
    return anyio.run(client_answers_ping, socket)


def why(done: subprocess.CompletedProcess[str], served: Served) -> str:
    """What a failed command and the daemon said, for the assertion message."""
    return f"stderr:\n{done.stderr}\ndaemon log (tail):\n{served.log.read_text()[-3000:]}"


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    socket: str
    log: Path


def start_serve(directory: Path) -> Served:
    """Start `dispatcher serve --simulate` and return once its socket answers a ping."""
    socket_path = str(directory / "d.sock")
    config = directory / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{directory / "state"}"\n', encoding="utf-8")
    log = directory / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dispatcher",
                "serve",
                "--simulate",
                "--time-scale",
                "0.05",
                "--config",
                str(config),
                "--socket",
                socket_path,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    deadline = time.monotonic() + START_DEADLINE_S
    while not answers_ping(socket_path):
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"serve did not answer within {START_DEADLINE_S} s")
        time.sleep(0.05)  # polling another process's readiness; nothing to wait on here
    return Served(process, socket_path, log)


def stop_serve(served: Served, signum: signal.Signals = signal.SIGTERM) -> int:
    if served.process.poll() is None:
        served.process.send_signal(signum)
    try:
        return served.process.wait(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        served.process.kill()
        raise


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One simulated daemon shared by this module's client tests."""
    running = start_serve(tmp_path_factory.mktemp("cli"))
    try:
        yield running
    finally:
        stop_serve(running)


def test_chat_prints_the_answer(served: Served) -> None:
    """`dispatcher chat TEXT` prints the answer on stdout and the provider line on stderr."""
    done = run_cli("chat", "what is a dispatcher", "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    assert "what is a dispatcher" in done.stdout
    assert "attempt" in done.stderr


def test_chat_stream_prints_the_answer(served: Served) -> None:
    """`dispatcher chat --stream` prints the whole answer as it arrives."""
    done = run_cli("chat", "stream me a reply please", "--stream", "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    assert "stream me a reply please" in done.stdout
    assert done.stdout.endswith("\n")


def test_chat_json_prints_one_result_object(served: Served) -> None:
    """`dispatcher chat --json` prints the whole result as one JSON object."""
    done = run_cli("chat", "as json", "--json", "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    result = json.loads(done.stdout)
    assert result["event"] == "result"
    assert "as json" in result["content"]
    assert result["provider"] in {"zhipu", "hunyuan", "nvidia1", "nvidia2"}
    assert result["usage"]["total_tokens"] > 0


def test_chat_error_exits_non_zero_with_the_reason(served: Served) -> None:
    """A refused chat exits 1 and prints the daemon's sentence saying why on stderr."""
    done = run_cli("chat", "hi", "--provider", "ghost", "--socket", served.socket)
    assert done.returncode == 1
    assert "ghost" in done.stderr
    assert "known providers" in done.stderr


def test_chat_error_shows_the_error_code(served: Served) -> None:
    """The error line names the wire code (e.g. no_provider) so scripts and people can match it."""
    done = run_cli("chat", "hi", "--provider", "ghost", "--socket", served.socket)
    assert "no_provider" in done.stderr


def test_embed_prints_one_vector_per_text(served: Served) -> None:
    """`dispatcher embed A B` prints one line per text with the vector's size."""
    done = run_cli("embed", "first text", "second text", "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "1024 dims" in lines[0]
    assert lines[0].endswith("first text")
    assert lines[1].endswith("second text")


def test_status_prints_a_table_of_providers(served: Served) -> None:
    """`dispatcher status` prints a table naming every provider and its state."""
    done = run_cli("status", "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    for name in ("zhipu", "hunyuan", "nvidia1", "nvidia2", "siliconflow"):
        assert name in done.stdout
    assert "ready" in done.stdout


def test_status_json_is_valid_json(served: Served) -> None:
    """`dispatcher status --json` prints the status reply as JSON."""
    done = run_cli("status", "--json", "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    status = json.loads(done.stdout)
    assert status["event"] == "status"
    assert set(status["providers"]) == {"zhipu", "hunyuan", "nvidia1", "nvidia2", "siliconflow"}
    assert status["providers"]["nvidia1"]["rpm"] == 40


def test_clients_find_the_socket_through_the_environment(served: Served) -> None:
    """With no --socket, clients use $DISPATCHER_SOCKET."""
    done = run_cli("status", "--json", env=clean_env(DISPATCHER_SOCKET=served.socket))
    assert done.returncode == 0, why(done, served)
    assert json.loads(done.stdout)["event"] == "status"


def test_batch_writes_one_line_per_input_line_in_order(served: Served, tmp_path: Path) -> None:
    """`dispatcher batch IN -o OUT` writes one answer per input line, in input order."""
    source = tmp_path / "in.jsonl"
    prompts = [f"batch prompt number {i}" for i in range(8)]
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    target = tmp_path / "out.jsonl"
    done = run_cli("batch", str(source), "-o", str(target), "--socket", served.socket)
    assert done.returncode == 0, why(done, served)
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(records) == len(prompts)
    for number, (record, prompt) in enumerate(zip(records, prompts, strict=True), start=1):
        assert record["line"] == number
        assert record["event"] == "result"
        assert prompt in record["content"]


def test_client_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    """A client finding no daemon exits 69 and prints the command that starts one."""
    done = run_cli("status", "--socket", str(tmp_path / "nobody.sock"))
    assert done.returncode == 69
    assert "dispatcher serve" in done.stderr
    assert "nobody.sock" in done.stderr


@pytest.mark.parametrize("make", ["missing", "directory", "not-utf8"])
def test_batch_on_an_unreadable_file_prints_one_line(tmp_path: Path, make: str) -> None:
    """A missing, unreadable or non-UTF-8 input file gets one line saying so, and exit 2."""
    path = tmp_path / "in.jsonl"
    if make == "directory":
        path.mkdir()
    elif make == "not-utf8":
        path.write_bytes(b"\xff\xfe{}\n")
    done = run_cli("batch", str(path), "--socket", str(tmp_path / "nobody.sock"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(path) in lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_serve_cleanly(tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM or SIGINT makes `serve` exit 0 and remove its socket file."""
    running = start_serve(tmp_path)
    code = stop_serve(running, signum)
    assert code == 0, running.log.read_text()
    assert not Path(running.socket).exists()
    assert "daemon.stopped" in running.log.read_text()


def test_a_port_in_use_is_one_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """serve with its HTTP port taken exits 71 with one line saying so, and removes its socket."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nsocket = "{tmp_path / "d.sock"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\nallow_anonymous = true\n'
    )
    try:
        done = run_cli("serve", "--simulate", "--config", str(config))
    finally:
        busy.close()
    assert done.returncode == 71, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    failures = [line for line in done.stdout.splitlines() if '"level": "critical"' in line]
    assert len(failures) == 1
    assert "address already in use" in failures[0].lower()
    assert not (tmp_path / "d.sock").exists()
