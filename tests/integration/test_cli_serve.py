"""`resillm serve` as a user runs it: a real process, a real port, SIGTERM to stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo.yaml"


def start(*args: str, config: Path = DEMO) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "resillm.cli", "serve", "-c", str(config), "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group: workers included in kill_all
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, f"no address in {line!r}"
    url = f"http://127.0.0.1:{match.group(1)}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if request(url, "GET", "/health")[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.05)
    kill_all(process)
    raise AssertionError("the gateway did not come up")


def kill_all(process: subprocess.Popen[str]) -> None:
    """SIGKILL the server and any worker it leaves behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def request(
    url: str, method: str, path: str, body: object = None
) -> tuple[int, dict[str, str], bytes]:
    connection = connect(url)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[str]:
    process, url = start(*request.param)
    try:
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                kill_all(process)
        assert process.stderr is not None
        process.stderr.close()
    assert process.returncode == 0  # drained and stopped, workers included


@pytest.mark.parametrize(
    "served", [(), ("--workers", "2")], ids=["one", "two-workers"], indirect=True
)
def test_serve_answers_the_demo_and_stops_on_sigterm(served: str) -> None:
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(4):
        status, headers, answer = request(served, "POST", "/v1/chat/completions", body)
        assert status == 200
        assert json.loads(answer)["model"] == "mock-stable-1"
        assert headers["x-resillm-provider"] == "stable"


class StderrLines:
    """Reads a process's stderr on a thread (so the pipe never fills), keeping the lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        with self._changed:
            seen = self._changed.wait_for(
                lambda: sum(text in line for line in self.lines) >= count, timeout
            )
        assert seen, f"{count} x {text!r} not in:\n{''.join(self.lines)}"

    def join(self) -> None:
        self._thread.join(10)


# A stream of 20 chunks 0.1 s apart: still going well after the signal.
SLOW_STREAM = """\
server: {graceful_timeout: 10s}
providers:
  slow: {type: mock, chunk_delay: 100ms, chunks: 20}
models:
  slow:
    targets: [{provider: slow, model: mock-slow-1}]
    pricing: {input_per_mtok: 1000, output_per_mtok: 1000}
logging: {level: info, format: text}
"""


def refused_by(url: str, deadline_s: float) -> float:
    """Connect until the server refuses; return when it did."""
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
        except ConnectionRefusedError:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError("still accepting connections after SIGTERM")


@pytest.mark.parametrize("workers", [1, 2], ids=["one", "two-workers"])
def test_sigterm_lets_an_inflight_stream_finish(workers: int, tmp_path: Path) -> None:
    config = tmp_path / "resillm.yaml"
    snapshot = tmp_path / "budget.json"
    budget = f"budget: {{hourly_limit: 100, snapshot_path: '{snapshot}'}}\n"
    # Several workers with a memory budget are refused (see below): no budget there.
    config.write_text(SLOW_STREAM + (budget if workers == 1 else ""))
    process, url = start("--workers", str(workers), config=config)
    assert process.stderr is not None
    log = StderrLines(process.stderr)
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        log.wait_for("Running on", count=workers)  # every worker is up
        if workers > 1:  # the supervisor passes SIGHUP on: each worker reloads
            process.send_signal(signal.SIGHUP)
            log.wait_for("config reload", count=workers)
        connection = connect(url)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
        response = connection.getresponse()
        first = response.readline().decode().strip()
        process.send_signal(signal.SIGTERM)  # while the stream is still going
        refused_at = refused_by(url, 1.5)  # no new connections while draining
        lines, last_at = [], 0.0
        while line := response.readline():
            if line.strip():
                lines.append(line.decode().strip())
                last_at = time.monotonic()
        connection.close()
        assert first.startswith("data: ")
        assert lines[-1] == "data: [DONE]"
        assert sum('"content"' in line for line in [first, *lines]) >= 20
        assert last_at - refused_at > 0.3  # the stream went on after the socket closed
        assert process.wait(15) == 0
    finally:
        kill_all(process)  # a no-op after a clean exit; else nothing may outlive the test
        log.join()
        process.stderr.close()
    if workers == 1:  # the budget snapshot was written on the way out
        saved = json.loads(snapshot.read_text())
        assert {w["key"][:8] for w in saved["windows"]} == {"global:h", "global:d"}
        assert all(w["spent"] > 0 and w["requests"] == 1 for w in saved["windows"])


def test_several_workers_refuse_a_memory_budget_with_limits(tmp_path: Path) -> None:
    # Each worker would enforce the whole limit alone, and the workers would overwrite one
    # another's snapshot: serve refuses before it binds.
    config = tmp_path / "resillm.yaml"
    config.write_text(SLOW_STREAM + "budget: {hourly_limit: 1.0}\n")
    serve = subprocess.run(
        [sys.executable, "-m", "resillm.cli", "serve", "-c", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert serve.returncode == 1
    assert "budget.store: redis" in serve.stderr and "serving on" not in serve.stderr


def test_version_and_check() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "resillm.cli", "version"], capture_output=True, text=True, check=True
    )
    assert re.fullmatch(r"resillm \d+\.\d+\.\d+\n", version.stdout)
    check = subprocess.run(
        [sys.executable, "-m", "resillm.cli", "check", "-c", str(DEMO)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0
    assert "demo [priority]: flaky/mock-flaky-1 -> stable/mock-stable-1" in check.stdout
