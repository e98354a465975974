"""``make demo``: a daemon on the simulator, a small batch with a progress bar, the status table.

Everything runs under a temporary directory and stops at the end; no keys and
no network are needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from dispatcher.client.connection import answers_ping

PROMPTS = [
    ("realtime", "What time zone is Shanghai in?"),
    ("bulk", "Summarise this paragraph about token buckets in one sentence."),
    ("default", "Translate 'good morning' into Chinese."),
    ("complex", "Prove that the square root of 2 is irrational."),
    ("default", "用一句话解释什么是限流。"),
]


def _dispatcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "dispatcher", *args]


def _wait_for_socket(path: Path, daemon: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited early with code {daemon.returncode}")
        if anyio.run(answers_ping, str(path)):
            return
        time.sleep(0.05)
    raise SystemExit(f"the daemon did not come up within {deadline_s:g} s")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dispatcher-demo-") as tmp:
        root = Path(tmp)
        sock = root / "dispatcher.sock"
        env = {**os.environ, "DISPATCHER_SOCKET": str(sock)}
        print(f"starting the daemon on the simulator (socket {sock}) ...", flush=True)
        log = (root / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            _dispatcher(
                "serve", "--simulate", "--time-scale", "0.1", "--state-dir", str(root / "state")
            ),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_socket(sock, daemon, 20.0)
            jobs = root / "jobs.jsonl"
            with jobs.open("w", encoding="utf-8") as fh:
                for i in range(60):
                    task, text = PROMPTS[i % len(PROMPTS)]
                    fh.write(json.dumps({"prompt": f"{text} (#{i})", "task": task}) + "\n")
            print("\n$ dispatcher chat 'Hello!' --task realtime", flush=True)
            subprocess.run(_dispatcher("chat", "Hello!", "--task", "realtime"), env=env, check=True)
            print("\n$ dispatcher batch jobs.jsonl -o answers.jsonl   (60 jobs)", flush=True)
            subprocess.run(
                _dispatcher("batch", str(jobs), "-o", str(root / "answers.jsonl")),
                env=env,
                check=True,
            )
            print("\n$ dispatcher status", flush=True)
            subprocess.run(_dispatcher("status"), env=env, check=True)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            log.close()
            print(
                f"\ndaemon stopped (exit code {code}); its log had {_count_lines(root / 'daemon.log')} lines"
            )
    return 0


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open("rb"))
    except OSError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
