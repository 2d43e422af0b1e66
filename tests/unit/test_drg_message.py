"""Workflow messages between telerad-bridge sites (issue 5): build_message_mail -> parse_outer/parse_decrypted round
trips, the workflow header, the emergency flag and every refusal (server/mail/drg.py, Defect.WORKFLOW_PART)."""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import ErrorKind, ServerError
from server.mail import drg
from server.mail.mime import Defect, MailError
from tests.dicomdata import make_instance
from tests.unit.test_drg_mail import fake_decrypt, fake_encrypt

SENDER, RECIPIENT, MDN_TO = "Klinik B <dicom@site-b.example>", "dicom@site-a.example", "dicom@site-b.example"
REPORT = {"resourceType": "Task", "status": "accepted", "intent": "order",
          "basedOn": [{"type": "ServiceRequest",
                       "identifier": {"system": "https://telerad-bridge.de/fhir/sid/order",
                                      "value": "sr-1@dicom@site-a.example"}}],
          "note": [{"text": "Übernommen – Befund folgt"}]}
BODY = json.dumps(REPORT, ensure_ascii=False).encode("utf-8")


def build(resource: bytes = BODY, **overrides) -> bytes:
    kw = dict(sender=SENDER, recipient=RECIPIENT, mdn_to=MDN_TO, encrypt=fake_encrypt)
    kw.update(overrides)
    return drg.build_message_mail(resource, **kw)


def roundtrip(mail: bytes) -> tuple[drg.Outer, drg.Inner | drg.Message]:
    outer = drg.parse_outer(mail)
    assert outer.encrypted is not None
    return outer, drg.parse_decrypted(fake_decrypt(outer.encrypted))


def captured(**overrides) -> bytes:
    """The plaintext entity the builder handed to ``encrypt``."""
    seen: list[bytes] = []
    build(encrypt=lambda plain: seen.append(plain) or fake_encrypt(plain), **overrides)
    return seen[0]


def workflow_entity(parts: list[tuple[str, bytes]], *, header: bytes = b"X-TELERAD-WORKFLOW: 1\r\n",
                    extra: bytes = b"") -> bytes:
    """A hand-made decrypted workflow entity: multipart/mixed with the given (content type, body) parts."""
    out = [b'Content-Type: multipart/mixed; boundary="wf"\r\n', header, extra, b"\r\n"]
    for ctype, body in parts:
        out += [b"--wf\r\nContent-Type: ", ctype.encode(), b"\r\n\r\n", body, b"\r\n"]
    out.append(b"--wf--\r\n")
    return b"".join(out)


# ------------------------------------------------------------------------------------------------- round trips


def test_the_resource_survives_build_and_parse_exactly():
    outer, message = roundtrip(build())
    assert isinstance(message, drg.Message)
    assert message.resource == BODY
    assert json.loads(message.resource) == REPORT
    assert not message.emergency and not outer.emergency
    assert outer.kind is drg.MailKind.ENCRYPTED


def test_outer_has_the_workflow_header_and_no_set_headers():
    now = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    outer = drg.parse_outer(build(now=now, subject="Telekonsil-Status"))
    names = [f.name for f in outer.fields]
    assert names == ["from", "to", "date", "disposition-notification-to", "x-telerad-workflow", "message-id",
                     "subject", "mime-version", "content-type"]
    assert not any(n.startswith("x-telemedicine") for n in names)
    assert outer.set is None
    assert {f.name: f.value for f in outer.fields}["x-telerad-workflow"] == "1"
    assert outer.sender == "dicom@site-b.example" and outer.recipients == (RECIPIENT,)
    assert outer.mdn_to == MDN_TO and outer.subject == "Telekonsil-Status"
    assert outer.date == "Mon, 23 Nov 2026 12:00:00 +0000"
    assert re.fullmatch(r"<[0-9a-f]{32}@site-b\.example>", outer.message_id)


def test_the_signed_inner_entity_says_workflow_and_carries_one_fhir_json_part():
    plain = captured()
    assert plain.isascii() and plain.count(b"\n") == plain.count(b"\r\n")
    head = plain.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Content-Type: multipart/mixed;")
    assert b"\r\nX-TELERAD-WORKFLOW: 1" in head
    assert b"X-TELEMEDICINE-SET" not in plain and b"application/dicom" not in plain
    assert plain.count(b"Content-Type: application/fhir+json") == 1
    assert b'filename="workflow.json"' in plain or b"filename=workflow.json" in plain


def test_message_id_can_be_given():
    assert drg.parse_outer(build(message_id="<wf.1@site-b.example>")).message_id == "<wf.1@site-b.example>"
    ids = {drg.parse_outer(build()).message_id for _ in range(10)}
    assert len(ids) == 10


def test_emergency_flag_outside_and_inside():
    outer, message = roundtrip(build(emergency=True))
    assert outer.emergency and isinstance(message, drg.Message) and message.emergency
    headers = {f.name: f.value for f in outer.fields}
    assert headers["x-telemedicine-priority"] == "emergency" and headers["importance"] == "high"
    inner = {f.name: f.value for f in message.fields}
    assert inner["x-telemedicine-priority"] == "emergency" and inner["x-telerad-workflow"] == "1"


def test_largest_resource_is_accepted():
    body = b'{"resourceType":"Task","x":"' + b"a" * (drg.MAX_MESSAGE_BYTES - 30) + b'"}'
    assert len(body) <= drg.MAX_MESSAGE_BYTES
    _, message = roundtrip(build(body))
    assert isinstance(message, drg.Message) and message.resource == body


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("resource", [b"", b"{" + b" " * drg.MAX_MESSAGE_BYTES + b"}"], ids=["empty", "oversized"])
def test_builder_refuses_empty_and_oversized_resources(resource):
    with pytest.raises(ServerError) as info:
        build(resource)
    assert info.value.kind is ErrorKind.INVALID and info.value.parameter == "resource"


@pytest.mark.parametrize("kw, parameter", [
    ({"sender": "not an address"}, "sender"),
    ({"recipient": ""}, "recipient"),
    ({"mdn_to": "x"}, "mdn_to"),
    ({"message_id": "   "}, "message_id"),
])
def test_builder_refuses_bad_addresses_and_ids(kw, parameter):
    with pytest.raises(ServerError) as info:
        build(**kw)
    assert info.value.kind is ErrorKind.INVALID
    assert info.value.parameter == parameter


def test_builder_refuses_bad_encrypt_output():
    with pytest.raises(ServerError) as info:
        build(encrypt=lambda plain: b"")
    assert info.value.kind is ErrorKind.INTERNAL
    with pytest.raises(ServerError):
        build(encrypt=lambda plain: "-----BEGIN PGP MESSAGE-----\r\nü\r\n".encode())


@pytest.mark.parametrize("parts", [
    [("text/plain", b"hello")],
    [("application/fhir+json", b"{}"), ("application/fhir+json", b"{}")],
    [("application/json", b"{}")],
], ids=["only-text", "two", "plain-json"])
def test_a_workflow_entity_needs_exactly_one_fhir_json_part(parts):
    with pytest.raises(MailError) as info:
        drg.parse_decrypted(workflow_entity(parts))
    assert info.value.defect is Defect.WORKFLOW_PART


def test_a_workflow_entity_with_an_oversized_resource_is_refused():
    body = b"{" + b" " * drg.MAX_MESSAGE_BYTES + b"}"
    # base64 keeps the lines short (RFC 5322 2.1.1 line length is checked first)
    encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
    plain = (b'Content-Type: multipart/mixed; boundary="wf"\r\nX-TELERAD-WORKFLOW: 1\r\n\r\n'
             b"--wf\r\nContent-Type: application/fhir+json\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + encoded + b"--wf--\r\n")
    with pytest.raises(MailError) as info:
        drg.parse_decrypted(plain)
    assert info.value.defect is Defect.WORKFLOW_PART


def test_extra_parts_beside_the_one_resource_are_tolerated():
    message = drg.parse_decrypted(workflow_entity([("text/plain", b"note"), ("application/fhir+json", b'{"a":1}')]))
    assert isinstance(message, drg.Message) and message.resource == b'{"a":1}'


def test_a_workflow_entity_must_be_multipart_mixed():
    plain = b"Content-Type: application/fhir+json\r\nX-TELERAD-WORKFLOW: 1\r\n\r\n{}\r\n"
    with pytest.raises(MailError) as info:
        drg.parse_decrypted(plain)
    assert info.value.defect is Defect.INNER_NOT_MULTIPART


@pytest.mark.parametrize("header", [b"", b"X-TELERAD-WORKFLOW: 0\r\n", b"X-TELERAD-WORKFLOW: yes\r\n"])
def test_without_the_signed_workflow_header_the_entity_is_read_as_a_dicom_mail(header):
    """Only the signed inner header makes a message; without it a fhir+json-only entity is no DICOM mail."""
    with pytest.raises(MailError) as info:
        drg.parse_decrypted(workflow_entity([("application/fhir+json", b"{}")], header=header,
                                            extra=b"X-TELEMEDICINE-SETID: s\r\nX-TELEMEDICINE-SETPART: 1\r\n"
                                                  b"X-TELEMEDICINE-SETTOTAL: 1\r\n"))
    assert info.value.defect is Defect.NO_DICOM_PART


def test_an_outer_workflow_header_alone_does_not_make_a_dicom_mail_a_message():
    """The outer copy is unsigned: a DICOM instance mail whose outer header claims workflow is still an Inner."""
    mail = drg.build_instance_mail(make_instance(), sop_instance_uid="1.2.3.4", study_uid="1.2.3", set_id="s1",
                                   set_part=1, set_total=1, sender=SENDER, recipient=RECIPIENT, mdn_to=MDN_TO,
                                   encrypt=fake_encrypt, extra_headers={drg.WORKFLOW: "1"})
    outer, inner = roundtrip(mail)
    assert isinstance(inner, drg.Inner)
    assert {f.name for f in outer.fields} >= {"x-telerad-workflow"}


def test_an_ordinary_dicom_inner_entity_still_parses_as_inner():
    dicom = make_instance()
    mail = drg.build_instance_mail(dicom, sop_instance_uid="1.2.3.4", study_uid="1.2.3", set_id="s1", set_part=1,
                                   set_total=1, sender=SENDER, recipient=RECIPIENT, mdn_to=MDN_TO,
                                   encrypt=fake_encrypt, parts=[drg.Part("application/fhir+json", b"{}",
                                                                         filename="order.json")])
    outer, inner = roundtrip(mail)
    assert isinstance(inner, drg.Inner)
    assert inner.dicom == dicom and inner.set == drg.SetInfo("s1", 1, 1, "1.2.3")
    assert inner.parts == (drg.Part("application/fhir+json", b"{}", filename="order.json"),)
    assert drg.check_set(outer, inner) == inner.set


# ------------------------------------------------------------------------------------------------- properties

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.dictionaries(st.text(max_size=12), _json, max_size=6), emergency=st.booleans(),
       subject=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80))
def test_round_trip_property_for_arbitrary_json(payload, emergency, subject):
    body = json.dumps({"resourceType": "Task", **payload}, ensure_ascii=False).encode("utf-8")
    mail = build(body, emergency=emergency, subject=subject, message_id=f"<{uuid.uuid4().hex}@site-b.example>")
    assert max(len(line) for line in mail.split(b"\r\n")) <= 998
    outer, message = roundtrip(mail)
    assert isinstance(message, drg.Message)
    assert message.resource == body
    assert json.loads(message.resource) == {"resourceType": "Task", **payload}
    assert outer.emergency is message.emergency is emergency
    assert outer.set is None
