"""The exception for a request the caller got wrong, apart from every other failure, and the error object the HTTP
servers (workers and router) answer with.

Whoever validates user input (sampling parameters, grammars, logprob options, prompts, the HTTP payloads, tool
options) raises ``InvalidRequestError``; the HTTP server answers it, and only it, with 400.  Any other exception
from a request is a bug or an outage, answered with 500.  No radixlm imports: every layer may raise it.
"""

from __future__ import annotations

from typing import Any


class InvalidRequestError(ValueError):
    """A request, or one of its options, is invalid; the message says what and how to fix it.

    ``param`` names the offending field (OpenAI's error ``param``) where one field is to blame, in the words of the
    API that received it (e.g. ``temperature``, ``max_new_tokens``, ``messages``).  A ``ValueError`` so that callers
    of the offline engine that catch ``ValueError`` keep working.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an HTTP ``status``."""
    err_type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                500: "internal_server_error", 503: "service_unavailable"}.get(status, "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}
