"""One hierarchy of client-facing errors, mapped to each protocol's error format
in one middleware (`router.app.error_middleware`).

    ApiError (status, type, message, param, code)
    ├── BadRequest            400 invalid_request_error
    │   └── ContextTooLong    400 (names the prompt length and the context length)
    ├── Unauthorized          401 authentication_error
    ├── NotFound              404 not_found_error (unknown model, unknown path)
    ├── PayloadTooLarge       413 request_too_large
    ├── Overloaded            429 rate_limit_error (Retry-After)
    ├── WorkerFailed          502 api_error (a worker failed the request)
    └── Unavailable           503 service_unavailable (no healthy worker)
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


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ContextTooLong(BadRequest):
    def __init__(self, prompt_tokens: int, context_tokens: int):
        super().__init__(
            f"This model's maximum context length is {context_tokens} tokens, "
            f"but the prompt is {prompt_tokens} tokens.",
            param="messages",
            code="context_length_exceeded",
        )


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "request_too_large"


class Overloaded(ApiError):
    status = 429
    type = "rate_limit_error"


class WorkerFailed(ApiError):
    status = 502
    type = "api_error"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable"
