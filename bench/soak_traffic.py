"""The soak's clients: mixed requests through the gateway, each judged as the client sees it.

A request's `result` is `ok` (the whole, right answer: the mock's deterministic text or tool
call), `error STATUS CODE` (an OpenAI-shaped JSON error), `stream-error TYPE` (a stream
that ended with one error event after a prefix of the right text, no `[DONE]`), `left`
(the client itself hung up or timed out, on purpose), or `UNCLEAN: what` — anything else:
a transport failure the client did not cause, a 500, a body that is not OpenAI's shape, a
stream without `[DONE]` nor error, text that differs from the answer, two role chunks...
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
from soak_setup import KEYS, SCENARIOS, Scenario

from resillm.mock_upstream.answer import Answer, Prompt, compose_answer

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
TOOL_ARGUMENTS = '{"city": "Paris"}'
TOPICS = ("rivers", "lanterns", "circuits", "glaciers", "budgets", "orbits", "harbors")
SLOW_CLIENT_TIMEOUT_S = 60.0  # above the gateway's 12 s deadline: only the gateway gives up
JUNK_SHARE = 0.03
REPEATED_SHARE, REPEATED = 0.2, 6  # requests whose question others ask too, and how many


@dataclass(frozen=True)
class Outcome:
    alias: str
    key: str
    client: str  # plain (aiohttp), sdk (openai), leave (hangs up mid-stream), hurry, junk
    stream: bool
    result: str

    @property
    def clean(self) -> bool:
        return not self.result.startswith("UNCLEAN")


@dataclass
class Traffic:
    """What the clients did and saw."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    unclean: list[str] = field(default_factory=list)  # the first few, with their request
    sent: int = 0  # requests begun
    done: int = 0  # requests whose outcome is known

    def record(self, outcome: Outcome, serial: int) -> None:
        self.outcomes[outcome] += 1
        self.done += 1
        if not outcome.clean and len(self.unclean) < 50:
            self.unclean.append(f"#{serial} {outcome}")


@dataclass(frozen=True)
class Call:
    """One chat completion to send, and the answer it must get."""

    scenario: Scenario
    body: dict[str, Any]
    answer: Answer

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def make_call(rng: random.Random, serial: int, scenario: Scenario, stream: bool) -> Call:
    if rng.random() < REPEATED_SHARE:  # asked before, by others too: the cache answers
        asked = rng.randrange(REPEATED)
        text = f"Soak question {asked}: tell me about {TOPICS[asked % len(TOPICS)]}."
    else:
        text = f"Soak request {serial}: tell me about {rng.choice(TOPICS)}."
    body: dict[str, Any] = {"model": scenario.alias, "stream": stream}
    tools = scenario.tools and rng.random() < 0.3
    if tools:
        text += " And what is the weather in Paris?"
        body["tools"] = [TOOL]
    max_tokens = None
    if not (scenario.recovers or tools) and rng.random() < 0.25:
        # Recovery continues an answer under the same max_tokens: left out where it may run.
        max_tokens = body["max_tokens"] = rng.randint(2, scenario.chunks + 2)
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    body["messages"] = [
        {"role": "system", "content": "You are a soak test."},
        {"role": "user", "content": text},
    ]
    prompt = Prompt(
        model=scenario.alias,
        text_chars=0,
        last_user_text=text,
        last_is_user=True,
        prefill=None,
        first_tool="get_weather" if tools else None,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=False,
    )
    return Call(scenario, body, compose_answer(prompt, scenario.chunks))


def judge_error(status: int, raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        kind, message = error["type"], error["message"]
        if not (isinstance(kind, str) and isinstance(message, str)):
            raise TypeError(error)
    except (ValueError, KeyError, TypeError):
        return f"UNCLEAN: {status} with a body that is not an OpenAI error: {raw[:120]!r}"
    if status == 500 or status < 400:
        return f"UNCLEAN: {status} {kind}: {message[:120]}"
    return f"error {status} {error.get('code') or kind}"


def _adds_up(usage: Any) -> bool:
    try:
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        return bool(prompt > 0 and completion >= 0 and usage["total_tokens"] == prompt + completion)
    except (KeyError, TypeError):
        return False


def judge_answer(call: Call, raw: bytes) -> str:
    try:
        answer = json.loads(raw)
        message = answer["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"UNCLEAN: 200 with a body that is not an answer: {raw[:120]!r}"
    if not _adds_up(answer.get("usage")):
        return f"UNCLEAN: usage {answer.get('usage')}"
    if call.answer.tool_call is not None:
        calls = message.get("tool_calls") or [{}]
        arguments = calls[0].get("function", {}).get("arguments")
        return "ok" if arguments == TOOL_ARGUMENTS else f"UNCLEAN: tool call {calls!r}"
    if message.get("content") != call.answer.text:
        return f"UNCLEAN: answer {message.get('content')!r}, expected {call.answer.text!r}"
    return "ok"


def judge_events(call: Call, events: list[bytes]) -> str:
    """A stream's `data:` payloads, as the gateway promises them (README, Streaming)."""
    ids: set[object] = set()
    roles, finished = 0, False
    usage: dict[str, Any] | None = None
    text: list[str] = []
    arguments: list[str] = []
    for index, payload in enumerate(events):
        last = index == len(events) - 1
        if payload == b"[DONE]":
            if not last:
                return "UNCLEAN: events after [DONE]"
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            return f"UNCLEAN: an event that is not JSON: {payload[:120]!r}"
        if "error" in chunk:
            if not last:
                return "UNCLEAN: events after an error event"
            delivered = "".join(text)
            if call.answer.tool_call is None and not call.answer.text.startswith(delivered):
                return f"UNCLEAN: {delivered!r} before the error is not the answer's start"
            return f"stream-error {chunk['error'].get('type')}"
        ids.add(chunk.get("id"))
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            if choice.get("index") != 0:
                continue
            delta = choice.get("delta") or {}
            roles += 1 if delta.get("role") else 0
            text.append(delta.get("content") or "")
            for tool_call in delta.get("tool_calls") or ():
                arguments.append((tool_call.get("function") or {}).get("arguments") or "")
            finished = finished or choice.get("finish_reason") is not None
    else:
        return f"UNCLEAN: the stream ended with neither [DONE] nor an error ({len(events)} events)"
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    problems = [
        (len(ids) != 1, f"chunk ids {sorted(map(str, ids))}"),
        (roles > 1, f"{roles} role chunks"),
        (not finished, "no finish reason before [DONE]"),
        (bool(usage) != wants_usage, f"usage {'missing' if wants_usage else 'not asked for'}"),
        (bool(usage) and not _adds_up(usage), f"usage {usage}"),
    ]
    if call.answer.tool_call is not None:
        problems.append(("".join(arguments) != TOOL_ARGUMENTS, f"tool arguments {arguments}"))
    else:
        got = "".join(text)
        problems.append((got != call.answer.text, f"text {got!r} != {call.answer.text!r}"))
    found = [what for bad, what in problems if bad]
    return f"UNCLEAN: {'; '.join(found)}" if found else "ok"


async def read_events(response: aiohttp.ClientResponse, leave_after: int | None) -> list[bytes]:
    """The `data:` payloads; returns early (the caller hangs up) after `leave_after` events."""
    events: list[bytes] = []
    data: list[bytes] = []
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif not line and data:
            events.append(b"\n".join(data))
            data = []
            if leave_after is not None and len(events) >= leave_after:
                return events
    if data:
        events.append(b"\n".join(data))
    return events


class Clients:
    """The soak's HTTP clients, shared by every worker."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        connector = aiohttp.TCPConnector(limit=concurrency * 2)
        self.http = aiohttp.ClientSession(connector=connector)
        self.sdk = {
            key: openai.AsyncOpenAI(
                base_url=url + "/v1", api_key=secret, max_retries=0, timeout=SLOW_CLIENT_TIMEOUT_S
            )
            for key, secret in KEYS.items()
        }

    async def aclose(self) -> None:
        await self.http.close()
        for client in self.sdk.values():
            await client.close()

    async def plain(self, call: Call, key: str, *, leave_after: int | None, limit: float) -> str:
        headers = {"Authorization": f"Bearer {KEYS[key]}"}
        url = self.url + "/v1/chat/completions"
        try:
            async with self.http.post(
                url, json=call.body, headers=headers, timeout=aiohttp.ClientTimeout(total=limit)
            ) as response:
                if response.status != 200:
                    return judge_error(response.status, await response.read())
                if not call.stream:
                    return judge_answer(call, await response.read())
                if response.content_type != "text/event-stream":
                    return f"UNCLEAN: a stream as {response.content_type}"
                events = await read_events(response, leave_after)
                if leave_after is not None and len(events) >= leave_after:
                    response.close()
                    return "left"
                return judge_events(call, events)
        except TimeoutError:
            return "left" if limit < SLOW_CLIENT_TIMEOUT_S else "UNCLEAN: client timeout"
        except aiohttp.ClientError as exc:
            return f"UNCLEAN: {type(exc).__name__}: {exc}"

    async def official(self, call: Call, key: str) -> str:
        """The same call through the official SDK, which users' code runs."""
        client = self.sdk[key]
        create: Any = client.chat.completions.create  # overloads keyed on `stream`
        parts: list[str] = []
        arguments: list[str] = []
        try:
            if not call.stream:
                answer = await create(**call.body)
                message = answer.choices[0].message
                parts.append(message.content or "")
                arguments.extend(c.function.arguments for c in message.tool_calls or ())
            else:
                ids, finished = set(), False
                async for chunk in await create(**call.body):
                    ids.add(chunk.id)
                    for choice in chunk.choices:
                        parts.append(choice.delta.content or "")
                        for tool_call in choice.delta.tool_calls or ():
                            arguments.append(tool_call.function.arguments or "")
                        finished = finished or choice.finish_reason is not None
                if len(ids) != 1 or not finished:
                    return f"UNCLEAN: sdk stream: ids {ids}, finished {finished}"
        except openai.APIStatusError as exc:
            status, code = exc.status_code, exc.code or exc.type
            return f"UNCLEAN: sdk {status} {code}" if status == 500 else f"error {status} {code}"
        except openai.APIConnectionError as exc:
            return f"UNCLEAN: sdk {type(exc).__name__}: {exc}"
        except openai.APIError as exc:  # an error event in the stream
            delivered = "".join(parts)
            if call.answer.tool_call is None and not call.answer.text.startswith(delivered):
                return f"UNCLEAN: sdk {delivered!r} before the error is not the answer's start"
            return f"stream-error {exc.type}"
        if call.answer.tool_call is not None:
            return "ok" if "".join(arguments) == TOOL_ARGUMENTS else f"UNCLEAN: sdk {arguments}"
        text = "".join(parts)
        return "ok" if text == call.answer.text else f"UNCLEAN: sdk text {text!r}"

    async def junk(self, rng: random.Random) -> tuple[str, str]:
        """A request the gateway must refuse, with the status it must refuse it with."""
        hello = [{"role": "user", "content": "hello"}]
        cases: list[tuple[str, str, Any, int]] = [
            ("not-json", KEYS["metered"], b"{nope", 400),
            ("unknown-model", KEYS["metered"], {"model": "nope", "messages": hello}, 404),
            ("bad-key", "sk-soak-wrong-key-0000", {"model": "m-steady", "messages": hello}, 401),
            ("other-key's-model", KEYS["loose"], {"model": "m-steady", "messages": hello}, 403),
            ("no-messages", KEYS["metered"], {"model": "m-steady"}, 400),
        ]
        name, secret, body, expected = rng.choice(cases)
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            async with self.http.post(
                self.url + "/v1/chat/completions", data=data, headers=headers
            ) as response:
                result = judge_error(response.status, await response.read())
        except aiohttp.ClientError as exc:
            return name, f"UNCLEAN: {type(exc).__name__}: {exc}"
        if response.status != expected:
            return name, f"UNCLEAN: {response.status}, expected {expected}: {result}"
        return name, result


def pick(rng: random.Random, key: str) -> tuple[str, int | None, float]:
    """How a client behaves: (kind, hang up after N events, its timeout)."""
    roll = rng.random()
    if key == "metered" or roll < 0.4:
        return "plain", None, SLOW_CLIENT_TIMEOUT_S
    if roll < 0.55:
        return "sdk", None, SLOW_CLIENT_TIMEOUT_S
    if roll < 0.8:
        return "leave", rng.randint(2, 5), SLOW_CLIENT_TIMEOUT_S
    return "hurry", None, rng.uniform(0.2, 1.2)


class Driver:
    """`concurrency` workers sending requests back to back until the deadline."""

    def __init__(self, clients: Clients, traffic: Traffic, seed: int) -> None:
        self.clients = clients
        self.traffic = traffic
        self.seed = seed
        self.weights = [s.weight for s in SCENARIOS]

    async def run(self, concurrency: int, seconds: float) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(self.worker(n, until) for n in range(concurrency)))

    async def worker(self, number: int, until: float) -> None:
        rng = random.Random(self.seed * 1009 + number)
        while time.monotonic() < until:
            serial = self.traffic.sent = self.traffic.sent + 1
            self.traffic.record(await self.one(rng, serial), serial)

    async def one(self, rng: random.Random, serial: int) -> Outcome:
        if rng.random() < JUNK_SHARE:
            name, result = await self.clients.junk(rng)
            return Outcome(name, "-", "junk", False, result)
        scenario = rng.choices(SCENARIOS, self.weights)[0]
        kind, leave_after, limit = pick(rng, scenario.key)
        stream = kind == "leave" or rng.random() < 0.6
        call = make_call(rng, serial, scenario, stream)
        if kind == "sdk":
            result = await self.clients.official(call, scenario.key)
        else:
            result = await self.clients.plain(
                call, scenario.key, leave_after=leave_after, limit=limit
            )
        if scenario.expect and result != scenario.expect and not result.startswith("UNCLEAN"):
            result = f"UNCLEAN: {result}, where only {scenario.expect!r} may be"
        return Outcome(scenario.alias, scenario.key, kind, stream, result)
