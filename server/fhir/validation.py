"""Content rules checked before a resource is stored, and the ``$validate`` outcome (FHIR R4 validation.html).

Structure is checked by ``model.parse_resource``; here come the rules ``fhir.resources`` does not know: the Task
state machine (task.html#statemachine, 409 on an illegal transition), businessStatus consistency, our profiles
and the R4 required bindings (``profiles.validate_resource``, 422 with every issue). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from server.errors import ErrorKind, ServerError
from server.fhir.outcome import Unprocessable, status_and_code
from server.fhir.profiles import Issue, Registry, Severity, load_registry, validate_resource
from server.fhir.task import BUSINESS_STATUS_SYSTEM, check_business_status, check_transition


def issue_json(issue: Issue) -> dict:
    """An OperationOutcome.issue of a profile Issue (R4 6.1.0)."""
    return {"severity": issue.severity, "code": issue.code, "diagnostics": issue.message,
            "expression": [issue.expression]}


def check_task(new: dict, old: dict | None) -> None:
    """Task.status transition from ``old`` (task.html#statemachine) and businessStatus consistency."""
    if new.get("resourceType") != "Task" or not isinstance(new.get("status"), str):
        return
    check_transition(old.get("status") if old else None, new["status"])
    for coding in (new.get("businessStatus") or {}).get("coding", []):
        if coding.get("system") == BUSINESS_STATUS_SYSTEM and coding.get("code"):
            check_business_status(new["status"], coding["code"])


def profile_issues(resource: dict, registry: Registry | None = None) -> list[dict]:
    """The issues (errors and warnings) of ``resource`` against its profiles and the R4 required bindings."""
    return [issue_json(i) for i in validate_resource(resource, registry or load_registry())]


def check_content(new: dict, old: dict | None, registry: Registry | None = None) -> None:
    """Raise CONFLICT for an illegal Task transition, Unprocessable (422) listing every profile error."""
    check_task(new, old)
    errors = [i for i in profile_issues(new, registry) if i["severity"] == Severity.ERROR]
    if errors:
        raise Unprocessable(errors)


def outcome_of(resource: dict, old: dict | None, mode: str | None) -> dict:
    """The OperationOutcome ``$validate`` answers (operation-resource-validate.html): all issues, or one
    informational issue when there are none. ``mode`` create/update also checks the Task transition."""
    issues: list[dict] = []
    if mode in ("create", "update"):
        try:
            check_task(resource, old if mode == "update" else None)
        except ServerError as exc:
            _, code = status_and_code(exc)
            issues.append({"severity": "error", "code": code, "diagnostics": exc.message,
                           "expression": [exc.parameter or resource.get("resourceType", "Resource")]})
    issues += profile_issues(resource)
    if not issues:
        issues = [{"severity": "information", "code": "informational", "diagnostics": "no issues"}]
    return {"resourceType": "OperationOutcome", "issue": issues}


def check_mode(mode: str | None) -> None:
    """``$validate`` mode (create, update, delete; R4 resource-validation-mode)."""
    if mode not in (None, "create", "update", "delete"):
        raise ServerError(ErrorKind.INVALID, f"unknown $validate mode {mode!r}", parameter="mode")


_RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[0-9]+)?$")


def literal_references(resource: dict) -> Iterator[tuple[str, str, str]]:
    """(expression, type, id) of every relative literal reference outside ``contained`` (references.html#literal).

    Absolute URLs (other servers), contained (``#id``) and logical references are not ours to resolve; an
    unresolved ``urn:uuid:`` (only a transaction resolves those) is yielded with type ``urn``.
    """
    def walk(node: object, path: str) -> Iterator[tuple[str, str, str]]:
        if isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{path}[{i}]")
        elif isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str):
                if ref.startswith(("urn:uuid:", "urn:oid:")):
                    yield path, "urn", ref
                elif m := _RELATIVE.match(ref):
                    yield path, m.group(1), m.group(2)
            for key, value in node.items():
                if key not in ("contained", "reference") and isinstance(value, (dict, list)):
                    yield from walk(value, f"{path}.{key}")

    yield from walk({k: v for k, v in resource.items() if k != "contained"}, resource["resourceType"])


def unresolved(expression: str, message: str) -> dict:
    """The OperationOutcome issue of a reference that does not resolve."""
    return {"severity": "error", "code": "not-found", "diagnostics": message, "expression": [expression]}
