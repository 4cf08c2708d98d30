"""Through a real nginx running ``deploy/nginx.conf``: streams, body limits, request ids,
and several gateway instances sharing one real ``redis-server``."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from resillm.cache_store import KEY_PREFIX
from resillm.mock_upstream import MockUpstream
from tests.conftest import openai_compatible, run_gateway
from tests.e2e.nginx import DEPLOY_CONF, nginx, template
from tests.integration.test_budget import COST, budget_config, budget_of, post
from tests.redis_server import redis_server

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


async def test_a_stream_arrives_through_nginx_as_it_is_generated(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = openai_compatible(
        upstream, headers={"x-mock-chunk-delay": "0.1", "x-mock-chunks": "8"}
    )
    arrivals: list[float] = []
    async with run_gateway(config) as gw, nginx([gw.url], tmp_path) as proxy:
        async with aiohttp.ClientSession() as session:
            body = {"model": "chat", "stream": True, "messages": HELLO}
            async with session.post(proxy.url + CHAT, json=body) as response:
                assert response.status == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = []
                async for line in response.content:
                    if line.startswith(b"data: "):
                        lines.append(line.strip())
                        if b'"content"' in line:
                            arrivals.append(time.monotonic())
    assert lines[-1] == b"data: [DONE]"
    assert len(arrivals) >= 8
    # Eight chunks 0.1 s apart upstream: unbuffered, the first reaches the client well
    # before the last (buffered, they would all come at once).
    assert arrivals[-1] - arrivals[0] > 0.35


async def test_a_body_over_the_limit_gets_a_json_413_from_nginx(tmp_path: Path) -> None:
    config = budget_config(tmp_path)
    async with run_gateway(config) as gw, nginx([gw.url], tmp_path / "nginx") as proxy:
        async with aiohttp.ClientSession() as session:
            big = io.BytesIO(b'{"model": "chat", "messages": [], "pad": "%s"}' % (b"x" * 10**7))
            headers = {"content-type": "application/json", "x-request-id": "too-big-1"}
            async with session.post(proxy.url + CHAT, data=big, headers=headers) as response:
                status, answer = response.status, await response.json()
                answered_id = response.headers["x-request-id"]
            # Under the limit, the request goes through to the gateway as usual.
            assert await post(session, proxy.url) == 200
    assert status == 413
    assert answer["error"]["code"] == "request_too_large"
    assert answer["error"]["type"] == "invalid_request_error"
    assert answered_id == "too-big-1"
    rejected = [e for e in proxy.access_log() if e["status"] == 413]
    assert len(rejected) == 1 and rejected[0]["upstream_addr"] == ""  # never reached it


async def test_request_ids_pass_through_nginx_or_are_made_there(tmp_path: Path) -> None:
    config = budget_config(tmp_path)
    async with run_gateway(config) as gw, nginx([gw.url], tmp_path / "nginx") as proxy:
        async with aiohttp.ClientSession() as session:
            body = {"model": "chat", "messages": HELLO}
            async with session.post(
                proxy.url + CHAT, json=body, headers={"x-request-id": "client-chosen-7"}
            ) as response:
                given = response.headers["x-request-id"]
            async with session.post(proxy.url + CHAT, json=body) as response:
                made = response.headers["x-request-id"]
    assert given == "client-chosen-7"
    assert re.fullmatch(r"[0-9a-f]{32}", made)  # nginx's $request_id, which the gateway kept
    assert [e["request_id"] for e in proxy.access_log()] == [given, made]


async def test_two_instances_behind_nginx_enforce_one_global_budget(tmp_path: Path) -> None:
    async with redis_server() as redis:
        config = budget_config(tmp_path, hourly_limit=0.03, store="redis", redis_url=redis.url)
        async with (
            run_gateway(config) as one,
            run_gateway(config) as two,
            nginx([one.url, two.url], tmp_path / "nginx") as proxy,
            aiohttp.ClientSession() as session,
        ):
            statuses = [await post(session, proxy.url) for _ in range(6)]
            spent = [(await budget_of(gw.url))["current_hour"]["spent"] for gw in (one, two)]
    # Each request costs 0.01: three fit in 0.03 across both instances together (each
    # on its own would have let three through).
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert spent == [pytest.approx(3 * COST)] * 2
    served_by = {e["upstream_addr"] for e in proxy.access_log() if e["status"] == 200}
    assert served_by == {one.url.removeprefix("http://"), two.url.removeprefix("http://")}


async def wait_until_cached(url: str) -> None:
    """The answer is stored once it has been sent: wait for it to be in Redis."""
    client = Redis.from_url(url)
    try:
        for _ in range(500):
            if await client.keys(KEY_PREFIX + "*"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the answer never reached Redis")
    finally:
        await client.aclose()


async def test_an_answer_cached_by_one_instance_is_a_hit_on_the_other(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    async with redis_server() as redis:
        config = openai_compatible(upstream)
        config["cache"] = {"enabled": True, "backend": "redis", "redis_url": redis.url}
        async with (
            run_gateway(config) as one,
            run_gateway(config) as two,
            nginx([one.url, two.url], tmp_path) as proxy,
            aiohttp.ClientSession() as session,
        ):
            answers = []
            for attempt in ("first", "second"):
                body = {"model": "chat", "messages": HELLO}
                async with session.post(
                    proxy.url + CHAT, json=body, headers={"x-request-id": attempt}
                ) as response:
                    assert response.status == 200
                    answers.append((response.headers["x-resillm-cache"], await response.json()))
                await wait_until_cached(redis.url)
    (first, first_body), (second, second_body) = answers
    assert (first, second) == ("miss", "hit")
    text = [b["choices"][0]["message"]["content"] for b in (first_body, second_body)]
    assert text[0] == text[1] and text[0]
    assert upstream.stats.requests == 1
    by_id = {e["request_id"]: e["upstream_addr"] for e in proxy.access_log()}
    assert by_id["first"] != by_id["second"]  # stored by one instance, found by the other


def test_the_test_copy_differs_from_deploy_nginx_conf_only_where_users_edit() -> None:
    text = template(DEPLOY_CONF.read_text(), port=1, upstreams=["a:1", "b:2"], log_dir=Path("/l"))
    assert "listen 127.0.0.1:1;" in text
    assert re.search(r"server a:1 [^;]*;\n\s*server b:2 [^;]*;", text)
    assert "access_log /l/resillm.access.log resillm_json;" in text
    too_large = re.search(r"return 413 '(.*)\\n';", text)
    assert too_large is not None
    assert json.loads(too_large.group(1))["error"]["code"] == "request_too_large"
