"""One protocol-neutral error tree, raised where a problem is found.

    ServerError(kind, message, *, detail=None)
      kind: ErrorKind
        INVALID          the request or payload is malformed (bad syntax, bad DICOM, bad parameter)
        UNSUPPORTED      well formed but asks for something we do not implement (media type, SOP class)
        NOT_ACCEPTABLE   we cannot produce any representation the client accepts
        NOT_FOUND        no such resource for this tenant (also used instead of FORBIDDEN across tenants)
        CONFLICT         the request conflicts with stored state (duplicate SOP Instance, UID mismatch)
        UNAUTHENTICATED  no or bad credentials
        FORBIDDEN        credentials lack the scope
        TOO_LARGE        payload over a configured limit
        SECURITY         signature/encryption failure, tampering
        UPSTREAM         a peer we depend on failed
        TIMEOUT          a peer or a lock did not answer in time
        INTERNAL         a bug or an unexpected environment failure; never shown in detail to a peer
        RESOURCES        out of resources (disk full, quota): PS3.18 A7xx

Each edge (HTTP/DICOMweb, FHIR, SMTP, MDN) owns one table from ErrorKind to its protocol's codes; a test
checks that every kind has an entry in every table. Foreign exceptions are translated with
``raise ServerError(...) from exc`` in the module that calls the foreign library.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """The protocol-neutral kinds of failure (DESIGN.md section 5)."""

    INVALID = "invalid"
    UNSUPPORTED = "unsupported"
    NOT_ACCEPTABLE = "not-acceptable"
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too-large"
    SECURITY = "security"
    UPSTREAM = "upstream"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    RESOURCES = "resources"


class ServerError(Exception):
    """A failure with a kind and a message that is safe to show to the peer.

    ``parameter`` names the request parameter or element at fault (QIDO key, FHIR expression).
    """

    def __init__(self, kind: ErrorKind, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.parameter = parameter

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"ServerError({self.kind.value!r}, {self.message!r}, parameter={self.parameter!r})"


def invalid(message: str, *, parameter: str | None = None) -> ServerError:
    """Shorthand for a ServerError of kind INVALID."""
    return ServerError(ErrorKind.INVALID, message, parameter=parameter)


def not_found(message: str = "Not found") -> ServerError:
    """Shorthand for a ServerError of kind NOT_FOUND."""
    return ServerError(ErrorKind.NOT_FOUND, message)
