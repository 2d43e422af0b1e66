"""OperationOutcome (FHIR R4 6.1.0 OperationOutcome) and the table from ErrorKind to HTTP status and issue code.

Issue codes: FHIR R4 value set ``issue-type`` (http://hl7.org/fhir/R4/valueset-issue-type.html).
HTTP statuses: FHIR R4 3.1.0.4 (update), 3.1.0.5.3 (conditional create), 3.1.0.7 (delete: 410 Gone).
"""

from __future__ import annotations

from server.errors import ErrorKind, ServerError

#: ErrorKind -> (HTTP status, OperationOutcome.issue.code)
FHIR_BY_KIND: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID: (400, "invalid"),
    ErrorKind.UNSUPPORTED: (415, "not-supported"),
    ErrorKind.NOT_ACCEPTABLE: (406, "not-supported"),
    ErrorKind.NOT_FOUND: (404, "not-found"),
    ErrorKind.CONFLICT: (409, "conflict"),
    ErrorKind.UNAUTHENTICATED: (401, "login"),
    ErrorKind.FORBIDDEN: (403, "forbidden"),
    ErrorKind.TOO_LARGE: (413, "too-costly"),
    ErrorKind.SECURITY: (403, "security"),
    ErrorKind.UPSTREAM: (502, "transient"),
    ErrorKind.TIMEOUT: (504, "timeout"),
    ErrorKind.INTERNAL: (500, "exception"),
    ErrorKind.RESOURCES: (507, "too-costly"),
}


class Gone(ServerError):
    """The resource was deleted (FHIR R4 3.1.0.7: read of a deleted resource answers 410)."""

    status = 410
    code = "deleted"

    def __init__(self, message: str = "resource deleted") -> None:
        super().__init__(ErrorKind.NOT_FOUND, message)


class MethodNotAllowed(ServerError):
    """An interaction the type does not support, e.g. a write to a read-only type (FHIR R4 3.1.0.1.9: 405)."""

    status = 405
    code = "not-supported"

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.FORBIDDEN, message)


class PreconditionFailed(ServerError):
    """If-Match stale, or a conditional interaction matched too many (FHIR R4 3.1.0.5.3, 3.1.0.4.1, 3.1.0.8)."""

    status = 412
    code = "conflict"

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(ErrorKind.CONFLICT, message, parameter=parameter)


class Unprocessable(ServerError):
    """A resource that breaks content rules (profiles, bindings, invariants): all issues are reported.

    ``issues`` are OperationOutcome issues (``severity``, ``code``, ``diagnostics``, ``expression``);
    FHIR R4 3.1.0.4 allows 400 or 422 for this; we answer 422 like HAPI and the FHIR test servers.
    """

    status = 422
    code = "processing"

    def __init__(self, issues: list[dict]) -> None:
        first = issues[0] if issues else {}
        expression = first.get("expression") or [None]
        super().__init__(ErrorKind.INVALID, first.get("diagnostics", "the resource is not valid"),
                         parameter=expression[0])
        self.issues = issues


def status_and_code(exc: ServerError) -> tuple[int, str]:
    """The HTTP status and issue code of an error (subclasses above override the kind's entry)."""
    status, code = FHIR_BY_KIND[exc.kind]
    return getattr(exc, "status", status), getattr(exc, "code", code)


def operation_outcome(code: str, message: str, *, severity: str = "error", expression: str | None = None) -> dict:
    """An OperationOutcome with one issue (FHIR R4 6.1.0)."""
    issue: dict = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def error_outcome(exc: ServerError) -> tuple[int, dict]:
    """The status and OperationOutcome of a ServerError."""
    status, code = status_and_code(exc)
    issues = getattr(exc, "issues", None)
    if issues:
        return status, {"resourceType": "OperationOutcome", "issue": list(issues)}
    return status, operation_outcome(code, exc.message, expression=exc.parameter)


def informational(message: str) -> dict:
    """The OperationOutcome of ``Prefer: return=OperationOutcome`` on success (FHIR R4 3.1.0.4.3)."""
    return operation_outcome("informational", message, severity="information")


_CODE_BY_STATUS = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
                   406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly",
                   415: "not-supported", 422: "processing"}


def code_for_status(status: int) -> str:
    """The issue code of an HTTP error raised outside our code (routing, request validation)."""
    return _CODE_BY_STATUS.get(status, "exception" if status >= 500 else "processing")
