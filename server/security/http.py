"""The HTTP edge of authentication: ``Authorization: Bearer`` (RFC 6750) to a Principal, scope checks."""

from __future__ import annotations

from fastapi import Request

from server.errors import ErrorKind, ServerError
from server.security.tokens import Access, Principal, verify


def principal_of(request: Request) -> Principal:
    """The caller of a request; UNAUTHENTICATED (401) without a valid bearer token (RFC 6750 3)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ServerError(ErrorKind.UNAUTHENTICATED, "bearer token required")
    return verify(request.app.state.token_key, token.strip())


def require(principal: Principal, resource: str, access: Access) -> Principal:
    """FORBIDDEN (403) unless the principal's scopes grant ``access`` on ``resource``."""
    if not principal.allows(resource, access):
        raise ServerError(ErrorKind.FORBIDDEN, f"scope does not allow {access.name.lower()} on {resource}")
    return principal
