"""Budget alerts: a JSON webhook, a Slack incoming webhook, e-mail over SMTP.

The budget store decides that a threshold was crossed (once per window, threshold and
scope, shared between instances with Redis); this module only delivers. Each delivery runs
in its own background task, tries :data:`ATTEMPTS` times with a short backoff, and never
blocks a request. Webhooks go through the gateway's shared aiohttp session; e-mail goes
through ``smtplib`` in a worker thread.

A delivery that fails every attempt (or is still running when the gateway stops, after
:data:`DRAIN_TIMEOUT_S`) is given up with one error line naming the channel and the alert,
never the URL or password. It is not sent again later: the threshold counts as crossed
(the store marked it when it was reached), and later thresholds and windows fire as usual.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp
import msgspec

from resillm.config import BudgetAlertsConfig, EmailAlertConfig

logger = logging.getLogger("resillm.alerts")
ATTEMPTS = 3
BACKOFF_S = (0.5, 2.0)  # waits between attempts
WEBHOOK_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 5.0  # how long stop() lets deliveries in flight finish


class BudgetAlert(msgspec.Struct, kw_only=True):
    """The JSON body of a webhook alert."""

    event: str = "budget_threshold"
    scope: str  # "global" or "key"
    key: str | None  # the client key's name for a key budget
    window: str  # "hour" or "day"
    window_start: str
    resets_at: str
    threshold: float
    spent: float  # USD
    limit: float  # USD

    def text(self) -> str:
        whose = "global" if self.key is None else f"key '{self.key}'"
        period = "hourly" if self.window == "hour" else "daily"
        return (
            f"resillm budget alert: {whose} {period} spend ${self.spent:.4f} reached "
            f"{self.threshold:.0%} of the ${self.limit:.2f} limit "
            f"(window {self.window_start}, resets {self.resets_at})"
        )


class SlackMessage(msgspec.Struct):
    text: str


_encoder = msgspec.json.Encoder()


class AlertDispatcher:
    def __init__(self, config: BudgetAlertsConfig) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        c = self.config
        return bool(c.webhook_url or c.slack_webhook_url or c.email)

    def fire(self, alert: BudgetAlert) -> None:
        """Schedule every configured channel's delivery; return at once."""
        config = self.config
        deliveries: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if config.webhook_url:
            body = _encoder.encode(alert)
            deliveries.append(("webhook", partial(self._post, config.webhook_url, body)))
        if config.slack_webhook_url:
            slack = _encoder.encode(SlackMessage(alert.text()))
            deliveries.append(("slack", partial(self._post, config.slack_webhook_url, slack)))
        if config.email is not None:
            email = config.email
            deliveries.append(("email", partial(asyncio.to_thread, send_email, email, alert)))
        what = alert.text().split(" (", 1)[0]
        for channel, deliver in deliveries:
            task = asyncio.get_running_loop().create_task(self._deliver(channel, deliver, what))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, channel: str, deliver: Callable[[], Awaitable[None]], what: str
    ) -> None:
        try:
            await self._attempts(channel, deliver, what)
        except asyncio.CancelledError:
            logger.error("budget alert via %s given up, the gateway is stopping: %s", channel, what)
            raise

    async def _attempts(
        self, channel: str, deliver: Callable[[], Awaitable[None]], what: str
    ) -> None:
        for attempt in range(ATTEMPTS):
            try:
                await deliver()
            # smtplib's SMTPException is an OSError
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if _refused(exc):
                    logger.error(
                        "budget alert via %s refused (%s), not retried; given up: %s",
                        channel, self._described(exc), what,
                    )  # fmt: skip
                    return
                if attempt + 1 == ATTEMPTS:
                    logger.error(
                        "budget alert via %s failed after %d attempts: %s; given up: %s",
                        channel, ATTEMPTS, self._described(exc), what,
                    )  # fmt: skip
                    return
                logger.warning(
                    "budget alert via %s failed, retrying: %s", channel, self._described(exc)
                )
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            else:
                return

    def _described(self, exc: BaseException) -> str:
        """The failure without the webhook URLs or the SMTP password: they are credentials."""
        if isinstance(exc, aiohttp.ClientResponseError):  # its text carries the URL
            return f"HTTP {exc.status} {exc.message}"
        if isinstance(exc, TimeoutError):  # aiohttp's connect timeout names the whole URL
            return "no answer in time"
        text = str(exc) or type(exc).__name__
        c = self.config
        for secret in (c.webhook_url, c.slack_webhook_url, c.email and c.email.password):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def _post(self, url: str, body: bytes) -> None:
        session = self.session
        if session is None or session.closed:
            raise aiohttp.ClientConnectionError("the gateway's HTTP session is not open")
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        headers = {"content-type": "application/json"}
        async with session.post(url, data=body, headers=headers, timeout=timeout) as response:
            await response.read()
            response.raise_for_status()

    async def drain(self) -> None:
        """Let deliveries in flight finish for a moment, then cancel what is left."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _refused(exc: BaseException) -> bool:
    """A 4xx answer (but 408 and 429) says the request itself is wrong: a wrong URL or
    token. Sending it again would only be refused again."""
    return (
        isinstance(exc, aiohttp.ClientResponseError)
        and 400 <= exc.status < 500
        and exc.status not in (408, 429)
    )


def send_email(config: EmailAlertConfig, alert: BudgetAlert) -> None:
    """Blocking: one message over SMTP (implicit TLS, STARTTLS or plain), in a thread."""
    import smtplib  # only where email alerts are configured, and only once one fires
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = alert.text().split(" (", 1)[0]
    message["From"] = config.from_
    message["To"] = ", ".join(config.to)
    message.set_content(alert.text() + "\n\n" + _encoder.encode(alert).decode() + "\n")
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if config.ssl:
        smtp = smtplib.SMTP_SSL(
            config.smtp_host, config.smtp_port, timeout=config.timeout, context=context
        )
    else:
        smtp = smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.timeout)
    with smtp:
        if config.starttls and not config.ssl:
            smtp.starttls(context=context)
        if config.username:
            smtp.login(config.username, config.password or "")
        smtp.send_message(message)
