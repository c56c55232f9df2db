"""One hierarchy of client-facing errors, mapped to each protocol's error format
in one middleware (`router.app.error_middleware`).

    ApiError (status, type, message, param, code)
    ├── BadRequest            400 invalid_request_error
    │   └── ContextTooLong    400 (names the prompt length and the context length)
    ├── Unauthorized          401 authentication_error
    ├── NotFound              404 not_found_error (unknown model, unknown path)
    ├── RequestTimeout        408 invalid_request_error (the body did not arrive in time)
    ├── PayloadTooLarge       413 request_too_large
    ├── Overloaded            429 rate_limit_error (Retry-After); Anthropic: 529 overloaded_error
    ├── WorkerFailed          502 api_error (a worker failed the request)
    └── Unavailable           503 service_unavailable (no healthy worker)

Each error renders in two formats: `openai_body()` ({"error": {"message", "type",
"param", "code"}}) and `anthropic_body()` ({"type": "error", "error": {"type",
"message"}}) with `anthropic_status`; `headers()` adds Retry-After where it applies.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error a client should see. status: HTTP status; type: OpenAI error type."""

    status = 500
    type = "api_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def openai_body(self) -> dict:
        """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def anthropic_status(self) -> int:
        """The HTTP status an Anthropic client expects for this error."""
        return self.status

    @property
    def anthropic_type(self) -> str:
        status = self.anthropic_status
        return ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")

    def anthropic_body(self) -> dict:
        """The Anthropic error object: {"type": "error", "error": {"type", "message"}}."""
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}

    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After for overload)."""
        return {}


# Anthropic's error types by HTTP status (docs.anthropic.com, "Errors").
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ContextTooLong(BadRequest):
    """The prompt leaves no room in the context. `param` names the request field
    that holds the prompt ("messages", "prompt", "input")."""

    def __init__(self, prompt_tokens: int, context_tokens: int, param: str = "messages"):
        super().__init__(
            f"This model's maximum context length is {context_tokens} tokens, "
            f"but the prompt is {prompt_tokens} tokens.",
            param=param,
            code="context_length_exceeded",
        )


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class RequestTimeout(ApiError):
    """The client did not send its request body within --body-read-timeout."""

    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "request_too_large"


class Overloaded(ApiError):
    """Too many requests queued. OpenAI: 429 with Retry-After; Anthropic: 529 overloaded_error."""

    status = 429
    type = "rate_limit_error"
    retry_after_s = 1

    def __init__(self, message: str = "the server is overloaded; retry shortly", *, retry_after_s: int | None = None,
                 **kw):
        super().__init__(message, **kw)
        if retry_after_s is not None:
            self.retry_after_s = max(1, int(retry_after_s))

    @property
    def anthropic_status(self) -> int:
        return 529

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class WorkerFailed(ApiError):
    status = 502
    type = "api_error"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable"
