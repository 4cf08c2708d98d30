"""A real nginx on a free loopback port, running the repository's ``deploy/nginx.conf``.

The deploy file is an ``http {}``-context file. The test copy differs in three places, the
ones its header marks for users: ``listen 80;`` becomes the test port, the upstream's
``server 127.0.0.1:8080 ...;`` line becomes one line per gateway under test, and
``/var/log/nginx/`` becomes the temporary directory. A minimal main config of our own
includes the copy and puts nginx's temporary files there too; nginx runs in the
foreground (``daemon off``) and is stopped when the block ends.

The binary comes from the system (``apt-get install nginx``; ``.ci/run`` installs it);
without it the tests that ask for one are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
START_TIMEOUT_S = 10.0
_UPSTREAM_LINE = re.compile(r"^(\s*)server 127\.0\.0\.1:8080 ([^;\n]*);$", re.M)

MAIN_CONF = """\
{user}worker_processes 1;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/resillm.conf;
}}
"""


def template(conf: str, *, port: int, upstreams: Sequence[str], log_dir: Path) -> str:
    """``deploy/nginx.conf`` with the test's port, gateways (``host:port``) and log dir."""

    def servers(match: re.Match[str]) -> str:
        indent, options = match.groups()
        return "\n".join(f"{indent}server {address} {options};" for address in upstreams)

    text, listens = re.subn(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{port};", conf, flags=re.M)
    text, lines = _UPSTREAM_LINE.subn(servers, text)
    assert (listens, lines) == (1, 1), "deploy/nginx.conf lost a line the tests replace"
    assert "/var/log/nginx/" in text
    return text.replace("/var/log/nginx/", f"{log_dir}/")


def nginx_binary() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("nginx", path=path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Nginx:
    url: str
    directory: Path

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access log lines so far (nginx writes each at the end of a request)."""
        path = self.directory / "resillm.access.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text() if path.exists() else ""


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@asynccontextmanager
async def nginx(gateway_urls: Sequence[str], directory: Path) -> AsyncIterator[Nginx]:
    """nginx in front of ``gateway_urls`` (``http://127.0.0.1:PORT``), files in ``directory``."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    upstreams = [url.removeprefix("http://") for url in gateway_urls]
    conf = template(DEPLOY_CONF.read_text(), port=port, upstreams=upstreams, log_dir=directory)
    (directory / "resillm.conf").write_text(conf)
    # As root, nginx's workers would switch to "nobody", who may not enter the test's
    # temporary directory; as anyone else the directive is ignored, so leave it out.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = directory / "nginx.conf"
    main.write_text(MAIN_CONF.format(user=user, tmp=directory))
    error_log = directory / "error.log"
    process = await asyncio.create_subprocess_exec(
        binary,
        "-p", str(directory),
        "-e", str(error_log),
        "-c", str(main),
        "-g", f"daemon off; pid {directory}/nginx.pid; error_log {error_log} info;",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    server = Nginx(f"http://127.0.0.1:{port}", directory)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not await _accepts(port):
                if process.returncode is not None:
                    raise RuntimeError(
                        f"nginx exited with {process.returncode}:\n{server.error_log()}"
                    )
                await asyncio.sleep(0.02)
        yield server
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # fast shutdown: connections are closed
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
