"""The error tree and its OpenAI-shaped JSON.

::

    GatewayError                      status, type, code; rendered by ``error_body``
    ├── InvalidRequest                400 invalid_request_error (bad JSON, bad fields)
    │   ├── RequestTooLarge           413 request_too_large, connection closed
    │   ├── RequestTimeout            408 request_timeout (body too slow), connection closed
    │   └── ModelNotFound             404 model_not_found
    ├── AuthenticationFailed          401 authentication_error / invalid_api_key
    ├── PermissionDenied              403 permission_error
    ├── NotFound                      404 for unknown paths
    ├── MethodNotAllowed              405
    ├── AllTargetsFailed              502 / 429 / 504 upstream_error, with error.attempts
    ├── CircuitOpen                   503 circuit_open, with Retry-After
    ├── BudgetExceeded                429 budget_exceeded, with Retry-After (window reset)
    ├── BudgetUnavailable             503 budget_unavailable (store down, fail-closed)
    └── UpstreamError                 something went wrong on the provider's side
        ├── UpstreamStatusError       the upstream answered with an HTTP error status
        ├── UpstreamConnectError      could not connect, or the connection broke
        ├── UpstreamTimeout           no answer (or no next chunk) in time
        └── UpstreamProtocolError     an answer we cannot read

Client mistakes are raised as the error they are and rendered by the errors middleware;
upstream errors carry what the router needs to decide on retries and fallbacks.
"""

from __future__ import annotations

import math

import msgspec


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


_encoder = msgspec.json.Encoder()


class GatewayError(Exception):
    """Base of every error resillm renders as OpenAI error JSON."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, code=self.code, param=self.param)

    def body(self) -> bytes:
        return _encoder.encode(ErrorBody(error=self.detail()))


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class _ClosingError(InvalidRequest):
    """Answered before the whole body was read: ``Connection: close`` makes the server
    drop the rest (uvicorn would otherwise read it to its end, however large or slow)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class RequestTooLarge(_ClosingError):
    status = 413
    code = "request_too_large"


class RequestTimeout(_ClosingError):
    status = 408
    code = "request_timeout"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class UpstreamError(GatewayError):
    """A failure of one upstream attempt. ``retryable``: worth trying the same target again."""

    status = 502
    type = "upstream_error"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, headers=headers)
        self.provider = provider
        self.model = model


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error; its status and error body are kept."""

    RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        provider: str = "",
        model: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, model=model)
        self.status = status
        self.upstream_type = error_type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.retryable = status in self.RETRYABLE_STATUSES

    def detail(self) -> ErrorDetail:
        # A client error the upstream diagnosed goes back as the upstream said it.
        error_type = self.upstream_type or (
            "invalid_request_error" if self.status < 500 else "upstream_error"
        )
        return ErrorDetail(message=self.message, type=error_type, code=self.code, param=self.param)


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class AttemptDetail(msgspec.Struct):
    provider: str
    model: str
    status: int | None
    message: str


class _AttemptsErrorDetail(ErrorDetail, kw_only=True):
    attempts: list[AttemptDetail]


class AllTargetsFailed(GatewayError):
    """Every target of the alias failed: 502, or 429 / 504 when every failure was one."""

    type = "upstream_error"
    code = "upstream_error"

    def __init__(self, alias: str, failures: list[UpstreamError]) -> None:
        self.failures = failures
        last = failures[-1].message if failures else "no target answered"
        super().__init__(f"every target of '{alias}' failed; last error: {last}")
        if failures and all(f.status == 429 for f in failures):
            self.status = 429
            waits = [
                f.retry_after_s
                for f in failures
                if isinstance(f, UpstreamStatusError) and f.retry_after_s is not None
            ]
            if waits:
                self.headers["Retry-After"] = str(max(1, math.ceil(min(waits))))
        elif failures and all(isinstance(f, UpstreamTimeout) for f in failures):
            self.status = 504
        else:
            self.status = 502

    def detail(self) -> ErrorDetail:
        attempts = [
            AttemptDetail(
                provider=f.provider,
                model=f.model,
                status=f.status if isinstance(f, UpstreamStatusError) else None,
                message=f.message,
            )
            for f in self.failures
        ]
        return _AttemptsErrorDetail(
            message=self.message, type=self.type, code=self.code, param=None, attempts=attempts
        )


class CircuitOpen(GatewayError):
    """Every target of the alias has an open circuit: nothing was sent upstream."""

    status = 503
    type = "circuit_open"
    code = "circuit_open"

    def __init__(self, alias: str, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"every target of '{alias}' is failing and its circuit is open; retry in {seconds}s",
            headers={"Retry-After": str(seconds)},
        )


class BudgetExceeded(GatewayError):
    """A budget window is used up under ``budget.action: reject``; retry when it resets."""

    status = 429
    type = "budget_exceeded"
    code = "budget_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(message, headers={"Retry-After": str(seconds)})


class BudgetUnavailable(GatewayError):
    """The budget store cannot be reached and ``budget.redis_failure`` is ``closed``."""

    status = 503
    type = "budget_unavailable"
    code = "budget_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})
