"""The STOW-RS status aggregation (PS3.18 Table 10.5.3-1), table-driven."""

from __future__ import annotations

import pytest

from server.dicomweb.status import Failed, FailureReason, Stored, WarningReason, stow_status

OK = Stored("1.2", "1.2.3", "url")
WARN = Stored("1.2", "1.2.4", "url", ((WarningReason.COERCION, "coerced"),))
BAD = Failed(FailureReason.CANNOT_UNDERSTAND, "not DICOM")
DUP = Failed(FailureReason.DUPLICATE_SOP_INSTANCE, "duplicate")
MISMATCH = Failed(FailureReason.STUDY_UID_MISMATCH, "other study")
SOP_CLASS = Failed(FailureReason.SOP_CLASS_NOT_SUPPORTED, "sop class")


@pytest.mark.parametrize("outcomes,status", [
    ([OK], 200),
    ([OK, OK], 200),
    ([WARN], 202),
    ([OK, WARN], 202),
    ([OK, BAD], 202),
    ([OK, DUP], 202),
    ([BAD], 400),
    ([BAD, BAD], 400),
    ([], 400),
    ([DUP], 409),
    ([MISMATCH], 409),
    ([SOP_CLASS], 409),
    ([BAD, MISMATCH], 409),
])
def test_stow_status(outcomes, status):
    assert stow_status(outcomes) == status
