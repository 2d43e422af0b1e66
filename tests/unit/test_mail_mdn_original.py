"""A queued receipt keeps only the original's header block: ``mdn.original_from_header`` rebuilds what
``build_mdn`` needs from it (server/mail/mdn.py, RFC 3798 2.1 and 3)."""

from __future__ import annotations

import re

import pytest

from server.mail import drg, mdn
from server.mail.mdn import Disposition
from tests.unit.test_drg_mail import build

ME = "dicom@site-b.example"
UA = "telerad-bridge/0.1.0"


@pytest.mark.parametrize("overrides", [{}, {"emergency": True, "subject": "Notfall CT Schädel"},
                                       {"extra_headers": {"References": "<a@x.example> <b@x.example>"}}],
                         ids=["plain", "emergency-umlaut-subject", "references"])
def test_header_block_gives_the_same_original(overrides):
    outer = drg.parse_outer(build(**overrides))
    again = mdn.original_from_header(outer.header_block)
    assert again.header_block == outer.header_block
    for name in ("kind", "fields", "message_id", "sender", "recipients", "subject", "date", "mdn_to", "set",
                 "emergency", "references"):
        assert getattr(again, name) == getattr(outer, name), name
    assert again.encrypted is None


def test_mdn_from_the_header_alone_equals_the_mdn_from_the_mail():
    outer = drg.parse_outer(build(extra_headers={"References": "<a@x.example>"}))
    kw = dict(disposition=Disposition.WARNING, reporting_ua=UA, final_recipient=ME,
              warning_or_error_text="Patientenname ergänzt", message_id="<mdn-1@site-b.example>")
    from_mail = mdn.build_mdn(outer, **kw)
    from_header = mdn.build_mdn(mdn.original_from_header(outer.header_block), **kw)
    assert _same_but_date_and_boundary(from_header) == _same_but_date_and_boundary(from_mail)
    parsed = mdn.parse_mdn(from_header)
    assert parsed.original_message_id == outer.message_id and parsed.disposition is Disposition.WARNING
    assert parsed.message_id == "<mdn-1@site-b.example>" and parsed.set == outer.set


def _same_but_date_and_boundary(raw: bytes) -> bytes:
    boundary = re.search(rb'boundary="([^"]+)"', raw).group(1)
    return re.sub(rb"^Date:[^\r]*\r\n", b"", raw.replace(boundary, b"B"), flags=re.MULTILINE)


@pytest.mark.parametrize("block", [b"From: a@x.example\nMessage-ID: <m1@x.example>\n",
                                   b"From: a@x.example\r\nMessage-ID: <m1@x.example>\r\n\r\n",
                                   b"From: a@x.example\r\nMessage-ID: <m1@x.example>"],
                         ids=["bare-lf", "with-empty-line", "no-final-crlf"])
def test_line_ends_and_a_trailing_empty_line_are_tolerated(block):
    original = mdn.original_from_header(block)
    assert original.message_id == "<m1@x.example>" and original.sender == "a@x.example"
    assert original.header_block == b"From: a@x.example\r\nMessage-ID: <m1@x.example>\r\n"
    assert original.mdn_to is None and original.set is None and original.kind is drg.MailKind.OTHER


def test_malformed_set_headers_read_as_absent():
    block = (b"From: a@x.example\r\nDisposition-Notification-To: a@x.example\r\nMessage-ID: <m2@x.example>\r\n"
             b"X-TELEMEDICINE-SETID: S\r\nX-TELEMEDICINE-SETPART: seven\r\nX-TELEMEDICINE-SETTOTAL: 9\r\n")
    original = mdn.original_from_header(block)
    assert original.set is None and original.mdn_to == "a@x.example"
    raw = mdn.build_mdn(original, disposition=Disposition.DELETED, reporting_ua=UA, final_recipient=ME)
    assert mdn.parse_mdn(raw).original_message_id == "<m2@x.example>"
