"""`resillm serve` as a user runs it: a real process, a real port, SIGTERM to stop."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo.yaml"


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "resillm.cli", "serve", "-c", str(DEMO), "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
    process.kill()
    raise AssertionError("the gateway did not come up")


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
                process.kill()
                process.wait()
        assert process.stderr is not None
        process.stderr.close()


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


def test_sigterm_lets_an_inflight_stream_finish() -> None:
    process, url = start()
    body = {"model": "plain", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        connection = connect(url)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
        response = connection.getresponse()
        first = response.readline().decode().strip()
        process.send_signal(signal.SIGTERM)  # while the stream is still going
        rest = [line.strip() for line in response.read().decode().splitlines() if line.strip()]
        connection.close()
        assert first.startswith("data: ")
        assert rest[-1] == "data: [DONE]"
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


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
