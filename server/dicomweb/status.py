"""STOW-RS outcome codes and the one function that turns per-instance outcomes into an HTTP status.

PS3.18 10.5.3 (Table 10.5.3-1 status codes), PS3.18 Annex I (Table I.2-1 FailureReason, Table I.2-2
WarningReason, from PS3.4 Annex B.2.3 / GG.4.1.2).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from server.errors import ErrorKind


class FailureReason(enum.IntEnum):
    """FailureReason (0008,1197) values we emit (PS3.4 B.2.3, PS3.18 Table I.2-1)."""

    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    STUDY_UID_MISMATCH = 0xA900  # alias: the data set does not match the study the URL names


class WarningReason(enum.IntEnum):
    """WarningReason (0008,1196) values (PS3.18 Table I.2-2)."""

    COERCION = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DOES_NOT_MATCH_SOP_CLASS = 0xB007


# Reasons that mean "the request could not be understood" (400 when nothing was stored);
# every other failure is a conflict with the archive or the target (409), PS3.18 Table 10.5.3-1.
SYNTAX_REASONS = frozenset({FailureReason.CANNOT_UNDERSTAND})

# ErrorKind raised while storing one part -> FailureReason of that part.
FAILURE_BY_KIND: dict[ErrorKind, FailureReason] = {
    ErrorKind.INVALID: FailureReason.CANNOT_UNDERSTAND,
    ErrorKind.UNSUPPORTED: FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
    ErrorKind.NOT_ACCEPTABLE: FailureReason.PROCESSING_FAILURE,
    ErrorKind.NOT_FOUND: FailureReason.PROCESSING_FAILURE,
    ErrorKind.CONFLICT: FailureReason.DUPLICATE_SOP_INSTANCE,
    ErrorKind.UNAUTHENTICATED: FailureReason.PROCESSING_FAILURE,
    ErrorKind.FORBIDDEN: FailureReason.PROCESSING_FAILURE,
    ErrorKind.TOO_LARGE: FailureReason.OUT_OF_RESOURCES,
    ErrorKind.SECURITY: FailureReason.PROCESSING_FAILURE,
    ErrorKind.UPSTREAM: FailureReason.PROCESSING_FAILURE,
    ErrorKind.TIMEOUT: FailureReason.PROCESSING_FAILURE,
    ErrorKind.INTERNAL: FailureReason.PROCESSING_FAILURE,
    ErrorKind.RESOURCES: FailureReason.OUT_OF_RESOURCES,
}


@dataclass(frozen=True)
class Stored:
    """One instance stored (maybe with warnings)."""

    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str
    warnings: tuple[tuple[WarningReason, str], ...] = ()


@dataclass(frozen=True)
class Failed:
    """One part not stored; UIDs are None when they could not be read."""

    reason: FailureReason
    message: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


Outcome = Stored | Failed


def stow_status(outcomes: Iterable[Outcome]) -> int:
    """HTTP status of a Store Instances response (PS3.18 Table 10.5.3-1).

    200: every instance stored without warnings. 202: some stored, and failures or warnings exist.
    400: nothing stored and every failure is a syntax failure (or the request held no part).
    409: nothing stored because of a conflict (SOP Class, Study UID mismatch, duplicate, mixed reasons).
    """
    items = list(outcomes)
    stored = [o for o in items if isinstance(o, Stored)]
    failed = [o for o in items if isinstance(o, Failed)]
    if stored:
        if failed or any(o.warnings for o in stored):
            return 202
        return 200
    if not failed or all(f.reason in SYNTAX_REASONS for f in failed):
        return 400
    return 409


# ErrorKind -> HTTP status of a DICOMweb response (PS3.18 8.5, Table 8.5.1-1 ... ; RFC 9110 15).
HTTP_STATUS_BY_KIND: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNSUPPORTED: 415,
    ErrorKind.NOT_ACCEPTABLE: 406,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.SECURITY: 400,
    ErrorKind.UPSTREAM: 502,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.INTERNAL: 500,
    ErrorKind.RESOURCES: 507,
}


def error_body(message: str, parameter: str | None = None) -> dict:
    """A DICOM JSON error payload: ErrorComment (0000,0902) and, if known, the offending parameter."""
    body = {"00000902": {"vr": "LO", "Value": [message]}}
    if parameter:
        body["0040A160"] = {"vr": "UT", "Value": [f"parameter: {parameter}"]}
    return body
