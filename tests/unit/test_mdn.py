"""RFC 3798 / RFC 8098 receipts: build each DRG disposition, parse other gateways' variants (server/mail/mdn.py)."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import ErrorKind
from server.mail import drg, mdn
from server.mail.mdn import Disposition, Outcome
from server.mail.mime import Defect, MailError, split_entity
from tests.unit.test_drg_mail import build

UA = "telerad-bridge; telerad-bridge 0.1"
ME = "dicom@site-b.example"


@pytest.fixture(scope="module")
def original() -> drg.Outer:
    return drg.parse_outer(build())


def defect_of(fn, *args) -> MailError:
    with pytest.raises(MailError) as info:
        fn(*args)
    return info.value


def report_fields(raw: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "message/disposition-notification"]
    body = part.as_bytes().split(b"\n\n", 1)[1].decode()
    return dict(line.split(": ", 1) for line in body.replace("\r\n", "\n").splitlines() if line)


@pytest.mark.parametrize("disposition, field, outcome", [
    (Disposition.DISPLAYED, "automatic-action/MDN-sent-automatically;displayed", Outcome.OK),
    (Disposition.WARNING, "automatic-action/MDN-sent-automatically;displayed/warning", Outcome.WARNING),
    (Disposition.ERROR, "automatic-action/MDN-sent-automatically;deleted/error", Outcome.FAILED_RETRY),
    (Disposition.DELETED, "automatic-action/MDN-sent-automatically;deleted", Outcome.FAILED_FINAL),
])
def test_each_drg_disposition_round_trips(original, disposition, field, outcome):
    raw = mdn.build_mdn(original, disposition=disposition, reporting_ua=UA, final_recipient=ME)
    assert f"Disposition: {field}\r\n".encode() in raw
    assert disposition.field == field and disposition.outcome is outcome
    parsed = mdn.parse_mdn(raw)
    assert parsed.original_message_id == original.message_id
    assert parsed.disposition is disposition and parsed.outcome is outcome
    assert parsed.mode == "automatic-action/mdn-sent-automatically"
    assert parsed.reporting_ua == UA and parsed.final_recipient == ME
    assert parsed.set == original.set
    assert parsed.error is None


def test_mdn_headers_and_parts_rfc3798(original):
    raw = mdn.build_mdn(original, disposition=Disposition.DISPLAYED, reporting_ua=UA, final_recipient=ME,
                        message_id="<mdn-1@site-b.example>")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert all(not m.defects for m in msg.walk())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert msg["To"] == original.mdn_to and msg["From"] == ME
    assert msg["In-Reply-To"] == original.message_id and msg["References"] == original.message_id
    assert msg["Message-ID"] == "<mdn-1@site-b.example>" and msg["Auto-Submitted"] == "auto-replied"
    text, report, headers = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "wurde empfangen und gespeichert" in text.get_content() and "was received and stored" in text.get_content()
    assert report.get_content_type() == "message/disposition-notification"
    assert headers.get_content_type() == "text/rfc822-headers"
    fields = report_fields(raw)
    assert fields == {"Reporting-UA": UA, "Final-Recipient": f"rfc822;{ME}",
                      "Original-Message-ID": original.message_id,
                      "Disposition": "automatic-action/MDN-sent-automatically;displayed"}
    assert raw.isascii() and raw.count(b"\n") == raw.count(b"\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert drg.parse_outer(raw).kind is drg.MailKind.MDN


def test_warning_and_error_text_go_into_their_fields(original):
    warn = mdn.build_mdn(original, disposition=Disposition.WARNING, reporting_ua=UA, final_recipient=ME,
                         warning_or_error_text="Zeichensatz ersetzt: Müller →\r\n Mueller")
    assert report_fields(warn)["Warning"] == "Zeichensatz ersetzt: Mueller Mueller"
    parsed = mdn.parse_mdn(warn)
    assert parsed.error == "Zeichensatz ersetzt: Mueller Mueller" and "Müller" in parsed.text
    err = mdn.build_mdn(original, disposition=Disposition.ERROR, reporting_ua=UA, final_recipient=ME,
                        warning_or_error_text="Speicher voll\x00\x07!")
    assert report_fields(err)["Error"] == "Speicher voll !"
    assert mdn.parse_mdn(err).error == "Speicher voll !"
    long = mdn.build_mdn(original, disposition=Disposition.DELETED, reporting_ua=UA, final_recipient=ME,
                         warning_or_error_text="x" * 5000)
    assert len(mdn.parse_mdn(long).error) == 500 and "x" * 5000 in mdn.parse_mdn(long).text


def test_original_recipient_only_when_the_original_had_it():
    outer = drg.parse_outer(b"Original-Recipient: rfc822;archiv@site-b.example\r\n" + build())
    raw = mdn.build_mdn(outer, disposition=Disposition.DISPLAYED, reporting_ua=UA, final_recipient=ME)
    assert report_fields(raw)["Original-Recipient"] == "rfc822;archiv@site-b.example"


def test_no_mdn_for_a_mail_that_asks_for_none():
    mail = build().replace(b"Disposition-Notification-To: mdn@site-a.example\r\n", b"")
    outer = drg.parse_outer(mail)
    assert outer.mdn_to is None
    error = defect_of(lambda: mdn.build_mdn(outer, disposition=Disposition.DELETED, reporting_ua=UA,
                                            final_recipient=ME))
    assert error.defect is Defect.NO_MDN_REQUESTED


def test_a_malformed_mail_can_still_be_answered():
    unencrypted = (b"From: a@site-a.example\r\nTo: b@site-b.example\r\nMessage-ID: <plain@site-a.example>\r\n"
                   b"Disposition-Notification-To: a@site-a.example\r\nSubject: DICOM-eMail\r\n\r\nhi\r\n")
    with pytest.raises(MailError):
        drg.parse_outer(unencrypted)
    raw = mdn.build_mdn(drg.read_outer(unencrypted), disposition=Disposition.DELETED, reporting_ua=UA,
                        final_recipient=ME, warning_or_error_text="unencrypted mail refused")
    parsed = mdn.parse_mdn(raw)
    assert parsed.original_message_id == "<plain@site-a.example>" and parsed.outcome is Outcome.FAILED_FINAL


# -------------------------------------------------------------------------------------- variants from other UAs


def foreign(disposition: str | None, *, original_id: str | None = "<orig@site-a.example>",
            in_reply_to: str | None = None, references: str | None = None, top: str = "multipart/report") -> bytes:
    head = "From: gw@site-c.example\r\nTo: mdn@site-a.example\r\nMessage-ID: <r1@site-c.example>\r\n"
    if in_reply_to:
        head += f"In-Reply-To: {in_reply_to}\r\n"
    if references:
        head += f"References: {references}\r\n"
    fields = "Reporting-UA: OtherGateway 2.3\r\nFinal-Recipient: rfc822; gw@site-c.example\r\n"
    if original_id:
        fields += f"Original-Message-ID: {original_id}\r\n"
    if disposition is not None:
        fields += f"Disposition: {disposition}\r\n"
    if top == "message/disposition-notification":
        return (head + "Content-Type: message/disposition-notification\r\n\r\n" + fields).encode()
    return (head + 'Content-Type: multipart/report; report-type=disposition-notification; boundary="XX"\r\n\r\n'
            "--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            ).encode() + "Empfangsbestätigung\r\n".encode("latin-1") + (
        "--XX\r\nContent-Type: message/disposition-notification\r\n\r\n" + fields + "--XX--\r\n").encode()


@pytest.mark.parametrize("value, disposition, dtype, modifiers", [
    ("automatic-action/MDN-sent-automatically; displayed", Disposition.DISPLAYED, "displayed", ()),
    ("automatic-action/MDN-sent-automatically;displayed", Disposition.DISPLAYED, "displayed", ()),
    ("Automatic-Action/MDN-Sent-Automatically ; Displayed / Warning", Disposition.WARNING, "displayed",
     ("warning",)),
    ("automatic-action/MDN-sent-automatically; deleted/error", Disposition.ERROR, "deleted", ("error",)),
    ("automatic-action/MDN-sent-automatically; deleted", Disposition.DELETED, "deleted", ()),
    ("manual-action/MDN-sent-manually; displayed", Disposition.DISPLAYED, "displayed", ()),
    ("automatic-action/MDN-sent-automatically; processed", Disposition.DISPLAYED, "processed", ()),
    ("automatic-action/MDN-sent-automatically; dispatched", Disposition.DISPLAYED, "dispatched", ()),
    ("automatic-action/MDN-sent-automatically; displayed/error", Disposition.WARNING, "displayed", ("error",)),
    ("automatic-action/MDN-sent-automatically; denied", Disposition.DELETED, "denied", ()),
    ("automatic-action/MDN-sent-automatically; failed", Disposition.ERROR, "failed", ()),
    ("automatic-action/MDN-sent-automatically; deleted/error,expired", Disposition.ERROR, "deleted",
     ("error", "expired")),
    ("automatic-action/MDN-sent-automatically (gateway) ; displayed (stored)", Disposition.DISPLAYED,
     "displayed", ()),
    ("displayed", Disposition.DISPLAYED, "displayed", ()),
])
def test_disposition_variants(value, disposition, dtype, modifiers):
    parsed = mdn.parse_mdn(foreign(value))
    assert (parsed.disposition, parsed.disposition_type, parsed.modifiers) == (disposition, dtype, modifiers)
    assert parsed.original_message_id == "<orig@site-a.example>"
    assert parsed.final_recipient == "gw@site-c.example" and parsed.text == "Empfangsbestätigung"
    assert parsed.modifier == (modifiers[0] if modifiers else None)


def test_original_id_falls_back_to_in_reply_to_then_references():
    no_id = foreign("automatic-action/MDN-sent-automatically; displayed", original_id=None,
                    in_reply_to="<orig2@site-a.example>")
    assert mdn.parse_mdn(no_id).original_message_id == "<orig2@site-a.example>"
    refs = foreign("displayed", original_id=None, references="<a@x> <orig3@site-a.example>")
    assert mdn.parse_mdn(refs).original_message_id == "<orig3@site-a.example>"
    bare = foreign("displayed", original_id="orig4@site-a.example")
    assert mdn.parse_mdn(bare).original_message_id == "<orig4@site-a.example>"
    error = defect_of(mdn.parse_mdn, foreign("displayed", original_id=None))
    assert error.defect is Defect.MDN_NO_ORIGINAL and error.kind is ErrorKind.INVALID


def test_top_level_disposition_notification_and_dsn_style_blank_lines():
    top = foreign("automatic-action/MDN-sent-automatically; deleted", top="message/disposition-notification")
    assert mdn.parse_mdn(top).disposition is Disposition.DELETED
    spaced = foreign("displayed").replace(b"Final-Recipient", b"\r\nFinal-Recipient")
    assert mdn.parse_mdn(spaced).disposition is Disposition.DISPLAYED


@pytest.mark.parametrize("raw, defect", [
    (foreign(None), Defect.MDN_DISPOSITION),
    (foreign("automatic-action/MDN-sent-automatically; exploded"), Defect.MDN_DISPOSITION),
    (foreign(""), Defect.MDN_DISPOSITION),
    (b"Content-Type: text/plain\r\n\r\nread\r\n", Defect.NOT_AN_MDN),
    (b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
     b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--\r\n", Defect.NOT_AN_MDN),
    (b'Content-Type: multipart/report; boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nx\r\n',
     Defect.MULTIPART_SYNTAX),
])
def test_malformed_mdns(raw, defect):
    assert defect_of(mdn.parse_mdn, raw).defect is defect


def test_every_disposition_has_an_outcome_and_a_text():
    assert set(mdn.OUTCOME) == set(Disposition)
    assert set(mdn._TEXT) == set(Disposition)
    assert {d.outcome for d in Disposition} == set(Outcome)


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=2000), disposition=st.sampled_from(list(Disposition)))
def test_any_text_builds_a_valid_mdn(original, text, disposition):
    raw = mdn.build_mdn(original, disposition=disposition, reporting_ua=UA, final_recipient=ME,
                        warning_or_error_text=text or None)
    assert raw.isascii() and max(len(line) for line in raw.split(b"\r\n")) <= 998
    parsed = mdn.parse_mdn(raw)
    assert parsed.disposition is disposition and parsed.original_message_id == original.message_id
    assert split_entity(raw).get("in-reply-to") == original.message_id
    if text.strip():
        assert " ".join(text.split()) in " ".join(parsed.text.split())


def test_error_kinds_map_to_receipts():
    assert mdn.disposition_for(None) is Disposition.DISPLAYED
    assert mdn.disposition_for(None, warning=True) is Disposition.WARNING
    assert mdn.disposition_for(ErrorKind.INVALID) is Disposition.DELETED
    assert mdn.disposition_for(ErrorKind.SECURITY) is Disposition.DELETED
    assert mdn.disposition_for(ErrorKind.RESOURCES) is Disposition.ERROR
    assert set(mdn.DISPOSITION_BY_KIND) == set(ErrorKind)
