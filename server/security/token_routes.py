"""The OAuth 2.0 token endpoint ``POST /auth/token`` (RFC 6749 4.4 client credentials, SMART Backend Services).

Parses the form and the Authorization header, calls ``oauth.exchange`` in a worker thread, renders the
access token response (RFC 6749 5.1) or the error response (RFC 6749 5.2).
"""

from __future__ import annotations

import functools
from urllib.parse import parse_qsl

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.security.oauth import (ALGORITHMS, AUTH_METHODS, GRANT_CLIENT_CREDENTIALS, OAuthError,
                                   OAuthErrorCode, TokenRequest, exchange, parse_basic, parse_form)
from server.store.clients import ClientStore

TOKEN_PATH = "/auth/token"
FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 5.1

#: HTTP status of each error code (RFC 6749 5.2: 400, except invalid_client with HTTP authentication: 401).
STATUS_BY_OAUTH_ERROR = {code: 400 for code in OAuthErrorCode}

router = APIRouter(tags=["Auth"])

_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string", "enum": [c.value for c in OAuthErrorCode]},
    "error_description": {"type": "string"}}}
_OPENAPI = {
    "requestBody": {"required": True, "content": {FORM: {"schema": {
        "type": "object", "required": ["grant_type", "scope"],
        "properties": {
            "grant_type": {"type": "string", "enum": [GRANT_CLIENT_CREDENTIALS]},
            "scope": {"type": "string", "description": "space separated SMART v2 system scopes"},
            "client_assertion_type": {"type": "string",
                                      "enum": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]},
            "client_assertion": {"type": "string", "description": f"JWT signed {' or '.join(ALGORITHMS)}"},
            "client_id": {"type": "string"},
            "client_secret": {"type": "string"},
        }}}}},
    "responses": {
        "200": {"description": "Access token (RFC 6749 5.1)", "content": {"application/json": {"schema": {
            "type": "object", "required": ["access_token", "token_type", "expires_in", "scope"],
            "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string"},
                           "expires_in": {"type": "integer"}, "scope": {"type": "string"}}}}}},
        "400": {"description": "Token error (RFC 6749 5.2)", "content": {"application/json": {"schema": _ERROR_SCHEMA}}},
        "401": {"description": "invalid_client with HTTP Basic authentication",
                "content": {"application/json": {"schema": _ERROR_SCHEMA}}},
    },
}


def token_endpoint(request: Request) -> str:
    """The absolute URL of the token endpoint: the ``aud`` every client assertion must carry."""
    configured = request.app.state.settings.public_base_url
    root = configured.rstrip("/") if configured else str(request.base_url).rstrip("/")
    return f"{root}{TOKEN_PATH}"


async def _form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != FORM:
        raise OAuthError(OAuthErrorCode.INVALID_REQUEST, f"the request body must be {FORM}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "the request body is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError(OAuthErrorCode.INVALID_REQUEST, "malformed form body") from exc
    return parse_form(pairs)


def _error(exc: OAuthError, basic: bool) -> Response:
    status = STATUS_BY_OAUTH_ERROR[exc.code]
    headers = dict(NO_STORE)
    if exc.code is OAuthErrorCode.INVALID_CLIENT and basic:
        status = 401
        headers["WWW-Authenticate"] = 'Basic realm="telerad-bridge"'
    return JSONResponse({"error": exc.code.value, "error_description": exc.message}, status_code=status,
                        headers=headers)


@router.post(TOKEN_PATH, openapi_extra=_OPENAPI, response_class=JSONResponse,
             description="OAuth 2.0 token endpoint: client_credentials grant (RFC 6749 4.4) for SMART Backend "
                         f"Services clients registered with `telerad client add`; client authentication "
                         f"{', '.join(AUTH_METHODS)}.")
async def token(request: Request) -> Response:
    authorization = request.headers.get("authorization", "")
    basic = authorization.strip().lower().startswith("basic")
    try:
        params = await _form(request)
        token_request = TokenRequest(params=params, basic=parse_basic(authorization))
        result = await anyio.to_thread.run_sync(functools.partial(
            exchange, token_request, clients=ClientStore(request.app.state.engine), key=request.app.state.token_key,
            audience=token_endpoint(request)))
    except OAuthError as exc:
        return _error(exc, basic)
    return JSONResponse(result.body(), headers=NO_STORE)
