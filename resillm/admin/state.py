"""What the admin page keeps across reloads: the chart ring, recent requests, sessions."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from resillm.admin.auth import AdminSessions
from resillm.admin.recent import RecentRequests
from resillm.admin.series import RequestSeries

Clock = Callable[[], float]
# Set by the process that starts several workers (a random value, made once), so a session
# signed by one worker is good on the others. Unset: each gateway makes its own secret.
SESSION_SECRET_ENV = "RESILLM_ADMIN_SESSION_SECRET"
MIN_SECRET_CHARS = 32


def shared_session_secret() -> bytes | None:
    value = os.environ.get(SESSION_SECRET_ENV, "")
    if len(value) < MIN_SECRET_CHARS:
        return None  # absent (one process), or too short to sign anything with
    return value.encode()


class AdminState:
    """Owned by the gateway (in ``GatewayState``): a reload keeps the charts, the recent
    requests and every signed-in session; a restart starts them afresh."""

    __slots__ = ("recent", "series", "sessions")

    def __init__(
        self,
        recent_requests: int = 200,
        clock: Clock = time.time,
        session_secret: bytes | None = None,
    ) -> None:
        self.series = RequestSeries(clock=clock)
        self.recent = RecentRequests(recent_requests, clock=clock)
        secret = session_secret if session_secret is not None else shared_session_secret()
        self.sessions = AdminSessions(clock=clock, secret=secret)
