"""One hierarchy of client-facing errors, mapped to each protocol's error format
in one middleware (`router.app.error_middleware`).

    ApiError (status, type, message, param, code)
    ├── BadRequest            400 invalid_request_error
    │   ├── ContextTooLong    400 context_length_exceeded (names the prompt and context lengths;
    │   │                         Anthropic: "prompt is too long: N tokens > M maximum")
    │   └── UnexpectedRole    400 an Anthropic message role, worded as the Anthropic API
    ├── Unauthorized          401 authentication_error
    ├── NotFound              404 not_found_error (unknown model, unknown path)
    ├── RequestTimeout        408 invalid_request_error (the body did not arrive in time)
    ├── PayloadTooLarge       413 request_too_large
    ├── Overloaded            429 rate_limit_error (Retry-After); Anthropic: 529 overloaded_error
    ├── WorkerFailed          502 api_error (a worker failed the request)
    └── Unavailable           503 service_unavailable (no healthy worker)

Each error renders in two formats: `openai_body()` ({"error": {"message", "type",
"param", "code"}}) and `anthropic_body()` ({"type": "error", "error": {"type",
"message"}}) with `anthropic_status` and `anthropic_message` (the Anthropic API's
wording where clients parse it: context length, overload, unexpected role);
`headers()` adds Retry-After where it applies.
"""

from __future__ import annotations

import json


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

    @property
    def anthropic_message(self) -> str:
        """The message Anthropic clients see (where they parse it, worded as the Anthropic API)."""
        return self.message

    def anthropic_body(self) -> dict:
        """The Anthropic error object: {"type": "error", "error": {"type", "message"}}."""
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.anthropic_message}}

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


class UnexpectedRole(BadRequest):
    """An Anthropic message with a role other than user, assistant or system. Worded as
    the Anthropic API words it ("Unexpected role ... input message role"): Claude Code
    matches that text to fall back to folding its system text into user turns."""

    def __init__(self, index: int, role):
        shown = (role if isinstance(role, str) else json.dumps(role))[:80]  # as much as other error texts repeat
        super().__init__(
            f'messages.{index}: Unexpected role "{shown}". The Messages API accepts "user" and "assistant" '
            f'(and "system" mid-conversation) as an input message role.',
            param=f"messages[{index}].role",
        )


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
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens

    @property
    def anthropic_message(self) -> str:
        """The Anthropic API's wording (M: the longest prompt that leaves room for one output
        token); Claude Code reads both numbers from it to compact its history by itself."""
        return f"prompt is too long: {self.prompt_tokens} tokens > {self.context_tokens - 1} maximum"


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

    @property
    def anthropic_message(self) -> str:
        """The Anthropic API's own text (clients match its type and status; the detail
        stays in the OpenAI body and the logs)."""
        return "Overloaded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class WorkerFailed(ApiError):
    status = 502
    type = "api_error"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable"
