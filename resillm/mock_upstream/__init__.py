"""A fake OpenAI + Anthropic upstream on a real socket, for resilience testing and benchmarks.

`resillm mock-upstream` runs it from the command line. In tests::

    upstream = await start_mock_upstream(MockUpstreamOptions(chunk_delay=0.01))
    client = openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="x")
    ...
    assert upstream.stats.disconnected == 1
    await upstream.close()

Routes: `POST /v1/chat/completions` (OpenAI), `POST /openai/deployments/{name}/chat/completions`
(Azure OpenAI), `POST /v1/messages` (Anthropic), `GET /v1/models`, `GET /health` and
`GET /_mock/stats` (the counters as JSON). Answers are deterministic; faults are set
server-wide by `MockUpstreamOptions` or per request by `x-mock-*` headers (see `faults`).
"""

from __future__ import annotations

from resillm.mock_upstream.options import MockUpstreamOptions, MockUpstreamStats
from resillm.mock_upstream.running import MockUpstream, run_mock_upstream, start_mock_upstream
from resillm.mock_upstream.server import app_stats, build_mock_app

__all__ = [
    "MockUpstream",
    "MockUpstreamOptions",
    "MockUpstreamStats",
    "app_stats",
    "build_mock_app",
    "run_mock_upstream",
    "start_mock_upstream",
]
