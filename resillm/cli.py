"""The ``resillm`` command: serve, check, mock-upstream, version."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import msgspec

from resillm import __version__
from resillm.config import Config
from resillm.config_loader import ConfigError, default_config_path, load_config
from resillm.durations import parse_duration
from resillm.pricing import builtin_price
from resillm.workers import per_worker_problems


def _duration(text: str) -> float:
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resillm", description="A resilient, OpenAI-compatible LLM gateway."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "-c", "--config", help="config file (default: $RESILLM_CONFIG or ./resillm.yaml)"
    )
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument(
        "--port", type=int, help="port to bind, 0 for any free one (default: server.port)"
    )
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.add_argument("--server", choices=("hypercorn", "uvicorn"), default="hypercorn")

    check = commands.add_parser("check", help="validate a config and summarise it")
    check.add_argument(
        "-c", "--config", help="config file (default: $RESILLM_CONFIG or ./resillm.yaml)"
    )

    mock = commands.add_parser("mock-upstream", help="run a fake OpenAI + Anthropic server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8081)
    mock.add_argument("--fail-rate", type=float, default=0.0, help="share of requests that fail")
    mock.add_argument("--fail-status", type=int, default=503, help="status of a failure")
    mock.add_argument("--latency", type=_duration, default=0.0, help="delay before answering")
    mock.add_argument("--chunk-delay", type=_duration, default=0.0, help="delay between chunks")
    mock.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    mock.add_argument("--seed", type=int, help="seed for --fail-rate")
    mock.add_argument("--retry-after", type=_duration, help="Retry-After sent with failures")
    mock.add_argument("--api-key", help="require this key (default: accept any)")
    mock.add_argument("--fail-first", type=int, default=0, help="fail the first N requests")
    mock.add_argument("--fail-code", help="error code of failures, e.g. context_length_exceeded")
    mock.add_argument("--cut-after", type=int, help="drop streams after N content chunks")
    mock.add_argument("--stall-after", type=int, help="stall streams after N content chunks")
    mock.add_argument("--malformed-at", type=int, help="a malformed event before chunk N")
    mock.add_argument("--error-event-after", type=int, help="an error event after N chunks")
    mock.add_argument("--no-finish", action="store_true", help="end streams without a finish")

    commands.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"resillm {__version__}")
        return 0
    if args.command == "check":
        return check(args.config or default_config_path())
    if args.command == "mock-upstream":
        return mock_upstream(args)
    from resillm.server import ServeOptions, serve

    return serve(
        ServeOptions(
            config_path=args.config or default_config_path(),
            host=args.host,
            port=args.port,
            workers=args.workers,
            server=args.server,
        )
    )


def check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} error(s) in {path}", file=sys.stderr)
        return 1
    problems = per_worker_problems(config, config.server.workers)
    for error in problems.errors:
        print(f"{path}: server.workers: {error}", file=sys.stderr)
    if problems.errors:
        print(f"{len(problems.errors)} error(s) in {path}", file=sys.stderr)
        return 1
    print(summary(path, config))
    for warning in problems.warnings:
        print(f"warning: {warning}")
    return 0


def summary(path: str, config: Config) -> str:
    server = config.server
    lines = [
        f"{path}: OK",
        f"server: http://{server.host}:{server.port}, {server.workers} worker(s), "
        f"body limit {server.max_request_bytes} bytes",
        "providers: " + ", ".join(f"{n} ({_type_name(p)})" for n, p in config.providers.items()),
        "models:",
    ]
    for alias, model in config.models.items():
        chain = " -> ".join(f"{t.provider}/{t.model}" for t in model.targets)
        extra = f"; then {', '.join(model.fallbacks)}" if model.fallbacks else ""
        lines.append(f"  {alias} [{model.strategy}]: {chain}{extra}")
    auth = config.auth
    lines.append(
        f"auth: {len(auth.keys)} client key(s)" if auth.keys else "auth: open (no client keys)"
    )
    lines.append(f"admin: {'on' if auth.admin_key else 'off'}")
    lines.append(_budget_summary(config))
    cache = config.cache
    lines.append(
        f"cache: {cache.backend}, ttl {cache.ttl:g}s, "
        f"coalescing {'on' if cache.coalesce else 'off'}"
        if cache.enabled
        else "cache: off"
    )
    lines.append(
        f"stream recovery: {'on' if config.resilience.stream_recovery else 'off'}; "
        f"logging: {config.logging.level}, {config.logging.format}"
    )
    tracing = config.tracing
    lines.append(
        f"tracing: {tracing.exporter} -> {tracing.endpoint or 'default endpoint'} "
        f"as {tracing.service_name!r}"
        if tracing.enabled
        else "tracing: off"
    )
    return "\n".join(lines)


def _budget_summary(config: Config) -> str:
    budget = config.budget
    limits = [
        f"{name} ${limit:g}"
        for name, limit in (("hourly", budget.hourly_limit), ("daily", budget.daily_limit))
        if limit is not None
    ]
    keyed = sum(1 for k in config.auth.keys if k.budget is not None)
    line = f"budget: {', '.join(limits) or 'no global limit'} ({budget.action})"
    line += f"; {keyed} key budget(s); store {budget.store}"
    channels = [
        name
        for name, on in (
            ("webhook", budget.alerts.webhook_url),
            ("slack", budget.alerts.slack_webhook_url),
            ("email", budget.alerts.email),
        )
        if on
    ]
    if channels:
        line += f"; alerts via {', '.join(channels)}"
    unpriced = sorted(
        {
            t.model
            for model in config.models.values()
            if model.pricing is None
            for t in model.targets
            if builtin_price(t.model) is None
        }
    )
    if unpriced:
        line += f"\n  no price known (cost 0, set models.*.pricing): {', '.join(unpriced)}"
    return line


def _type_name(provider: msgspec.Struct) -> str:
    return str(provider.__struct_config__.tag)


def mock_upstream(args: argparse.Namespace) -> int:
    from resillm.mock_upstream import MockUpstreamOptions, run_mock_upstream

    try:
        options = MockUpstreamOptions(
            fail_rate=args.fail_rate,
            fail_status=args.fail_status,
            latency=args.latency,
            chunk_delay=args.chunk_delay,
            chunks=args.chunks,
            seed=args.seed,
            retry_after=args.retry_after,
            api_key=args.api_key,
            fail_first=args.fail_first,
            fail_code=args.fail_code,
            cut_after=args.cut_after,
            stall_after=args.stall_after,
            malformed_at=args.malformed_at,
            error_event_after=args.error_event_after,
            no_finish=args.no_finish,
        )
    except ValueError as exc:
        print(f"resillm mock-upstream: {exc}", file=sys.stderr)
        return 2
    run_mock_upstream(options, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
