"""DRG @GIT DICOM e-mail: build -> parse round trips, header format, and every malformation (server/mail/drg.py)."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import ErrorKind, ServerError
from server.mail import drg
from server.mail.mime import Defect, MailError
from tests.dicomdata import make_instance, sample_bytes

BEGIN, END = b"-----BEGIN PGP MESSAGE-----\r\n\r\n", b"-----END PGP MESSAGE-----\r\n"


def fake_encrypt(plain: bytes) -> bytes:
    """Identity-like stand-in for sign+encrypt: the plaintext base64'd inside armor lines."""
    return BEGIN + base64.encodebytes(plain) + END  # bare LF on purpose: the builder canonicalises


def fake_decrypt(armored: bytes) -> bytes:
    assert armored.startswith(BEGIN) and armored.endswith(END)
    return base64.b64decode(armored[len(BEGIN) : -len(END)])


SENDER, RECIPIENT, MDN_TO = "Klinik A <dicom@site-a.example>", "dicom@site-b.example", "mdn@site-a.example"


def build(dicom: bytes | None = None, **overrides) -> bytes:
    kw = dict(sop_instance_uid="1.2.826.0.1.3680043.8.498.1", study_uid="1.2.826.0.1.3680043.8.498.2",
              set_id="SET-0001", set_part=2, set_total=5, sender=SENDER, recipient=RECIPIENT, mdn_to=MDN_TO,
              encrypt=fake_encrypt)
    kw.update(overrides)
    return drg.build_instance_mail(make_instance() if dicom is None else dicom, **kw)


def roundtrip(mail: bytes) -> tuple[drg.Outer, drg.Inner]:
    outer = drg.parse_outer(mail)
    assert outer.encrypted is not None
    return outer, drg.parse_inner(fake_decrypt(outer.encrypted))


def defect_of(fn, *args) -> MailError:
    with pytest.raises(MailError) as info:
        fn(*args)
    return info.value


def replace_header(mail: bytes, name: bytes, value: bytes) -> bytes:
    pattern = re.compile(rb"^" + name + rb":[^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n", re.IGNORECASE | re.MULTILINE)
    assert pattern.search(mail), name
    return pattern.sub(lambda _: name + b": " + value + b"\r\n", mail, count=1)


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "test-SR.dcm"])
def test_dicom_bytes_survive_build_and_parse_exactly(name):
    data = sample_bytes(name)
    outer, inner = roundtrip(build(data))
    assert inner.dicom == data
    assert inner.filename == "1.2.826.0.1.3680043.8.498.1.dcm"
    assert inner.set == outer.set == drg.SetInfo("SET-0001", 2, 5, "1.2.826.0.1.3680043.8.498.2")
    assert drg.check_set(outer, inner) == inner.set
    assert inner.parts == ()


def test_outer_headers_route_and_request_receipt():
    now = datetime(2026, 11, 23, 11, 0, tzinfo=timezone.utc)
    outer = drg.parse_outer(build(now=now))
    assert outer.kind is drg.MailKind.ENCRYPTED
    assert outer.sender == "dicom@site-a.example" and outer.recipients == ("dicom@site-b.example",)
    assert outer.subject == drg.DEFAULT_SUBJECT
    assert outer.date == "Mon, 23 Nov 2026 11:00:00 +0000"
    assert outer.mdn_to == MDN_TO
    assert re.fullmatch(r"<[0-9a-f]{32}@site-a\.example>", outer.message_id)
    assert not outer.emergency
    names = [f.name for f in outer.fields]
    assert names == ["from", "to", "date", "disposition-notification-to", "x-telemedicine-setid",
                     "x-telemedicine-setpart", "x-telemedicine-settotal", "x-telemedicine-studyid",
                     "message-id", "subject", "mime-version", "content-type"]


def test_pgp_mime_structure_rfc3156():
    mail = build()
    msg = email.message_from_bytes(mail, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    control, data = msg.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_payload().strip() == "Version: 1"
    assert data.get_content_type() == "application/octet-stream"
    assert data.get_payload().startswith("-----BEGIN PGP MESSAGE-----")


def test_message_ids_are_unique_and_can_be_given():
    ids = {drg.parse_outer(build()).message_id for _ in range(20)}
    assert len(ids) == 20
    assert drg.parse_outer(build(message_id="<fixed.1@site-a.example>")).message_id == "<fixed.1@site-a.example>"
    assert drg.parse_outer(build(message_id="fixed.2@site-a.example")).message_id == "<fixed.2@site-a.example>"


def test_encrypt_receives_a_canonical_7bit_multipart_mixed_entity():
    seen = []
    build(encrypt=lambda plain: seen.append(plain) or fake_encrypt(plain))
    (plain,) = seen
    assert plain.isascii()
    assert plain.count(b"\n") == plain.count(b"\r\n")
    assert plain.startswith(b"Content-Type: multipart/mixed;")
    inner = email.message_from_bytes(plain, policy=email.policy.default)
    (part,) = inner.get_payload()
    assert part.get_content_type() == "application/dicom"
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_content_disposition() == "attachment"
    assert part.get_filename() == "1.2.826.0.1.3680043.8.498.1.dcm"
    assert inner["X-TELEMEDICINE-SETID"] == "SET-0001"


def test_python_email_default_policy_reads_everything_without_defects():
    data = sample_bytes("CT_small.dcm")
    mail = build(data, parts=[drg.note("Bitte Befund bis Montag. Grüße"), drg.pdf(b"%PDF-1.4 fake")])
    msg = email.message_from_bytes(mail, policy=email.policy.default)
    assert all(not m.defects for m in msg.walk())
    inner = email.message_from_bytes(fake_decrypt(roundtrip(mail)[0].encrypted), policy=email.policy.default)
    assert all(not m.defects for m in inner.walk())
    dicom, text, report = inner.get_payload()
    assert dicom.get_content() == data
    assert text.get_content() == "Bitte Befund bis Montag. Grüße"
    assert report.get_content() == b"%PDF-1.4 fake" and report.get_filename() == "report.pdf"


def test_extra_parts_round_trip():
    _, inner = roundtrip(build(parts=[drg.note("Notfall: bitte sofort"), drg.pdf(b"%PDF-1.7 x", "befund.pdf")]))
    assert inner.parts == (drg.Part("text/plain", "Notfall: bitte sofort".encode(), charset="utf-8"),
                           drg.Part("application/pdf", b"%PDF-1.7 x", filename="befund.pdf"))


def test_emergency_flag_outside_and_inside():
    outer, inner = roundtrip(build(emergency=True))
    assert outer.emergency and inner.emergency
    headers = {f.name: f.value for f in outer.fields}
    assert headers["x-telemedicine-priority"] == "emergency"
    assert headers["importance"] == "high" and headers["x-priority"].startswith("1")
    assert not roundtrip(build())[1].emergency


def test_extra_headers_are_added_but_cannot_replace_ours():
    outer = drg.parse_outer(build(extra_headers={"X-TELEMEDICINE-KEYID": "0x1234ABCD"}))
    assert ("x-telemedicine-keyid", "0x1234ABCD") in [(f.name, f.value) for f in outer.fields]
    for name in ("Message-ID", "x-telemedicine-setid", "Content-Type", "Disposition-Notification-To"):
        with pytest.raises(ServerError) as info:
            build(extra_headers={name: "x"})
        assert info.value.parameter == name
    with pytest.raises(ServerError):
        build(extra_headers={"X-Evil": "a\r\nBcc: someone@example.org"})


def test_non_ascii_subject_and_sender_are_rfc2047_encoded():
    mail = build(subject="Befund Müller", sender="Dr. Jürgen Weiß <dicom@site-a.example>")
    head = mail.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    outer = drg.parse_outer(mail)
    assert outer.subject == "Befund Müller" and outer.sender == "dicom@site-a.example"


def test_all_lines_crlf_ascii_and_folded():
    subject = "DICOM-eMail" + " lang" * 40
    mail = build(subject=subject, extra_headers={"X-Note": "wort " * 60})
    assert mail.isascii() and mail.count(b"\n") == mail.count(b"\r\n")
    head = mail.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert max(len(line) for line in mail.split(b"\r\n")) <= 998
    reparsed = email.message_from_bytes(mail, policy=email.policy.default)
    assert reparsed["Subject"] == subject


def test_obsolete_white_space_before_the_colon_is_read():
    mail = build().replace(b"X-TELEMEDICINE-SETID:", b"X-TELEMEDICINE-SETID :", 1)
    assert drg.parse_outer(mail).set.set_id == "SET-0001"


def test_bare_lf_mail_is_canonicalised():
    data = sample_bytes("CT_small.dcm")
    mail = build(data).replace(b"\r\n", b"\n")
    _, inner = roundtrip(mail)
    assert inner.dicom == data


@pytest.mark.parametrize("kw, parameter", [
    ({"set_part": 6}, "X-TELEMEDICINE-SETPART"),
    ({"set_part": 0}, "X-TELEMEDICINE-SETPART"),
    ({"set_id": ""}, "X-TELEMEDICINE-SETID"),
    ({"set_id": "a\r\nb"}, "X-TELEMEDICINE-SETID"),
    ({"sender": "not an address"}, "sender"),
    ({"recipient": "x@y.example\r\nBcc: z@evil.example"}, "recipient"),
    ({"mdn_to": ""}, "mdn_to"),
    ({"sop_instance_uid": "../../etc/passwd"}, "sop_instance_uid"),
    ({"message_id": "   "}, "message_id"),
])
def test_builder_refuses_bad_arguments(kw, parameter):
    with pytest.raises(ServerError) as info:
        build(**kw)
    assert info.value.kind is ErrorKind.INVALID and info.value.parameter == parameter


@pytest.mark.parametrize("part", [drg.Part("application/dicom", make_instance()),
                                  drg.Part("application/octet-stream", make_instance(), filename="second.DCM"),
                                  drg.Part("application/pdf", b"%PDF", filename='a"b.pdf')])
def test_builder_refuses_a_second_dicom_part_and_bad_names(part):
    with pytest.raises(ServerError) as info:
        build(parts=[part])
    assert info.value.kind is ErrorKind.INVALID


def test_builder_refuses_non_dicom_and_bad_encrypt_output():
    assert defect_of(build, b"not a dicom file" * 20).defect is Defect.NOT_DICOM
    with pytest.raises(ServerError) as info:
        build(encrypt=lambda plain: plain.replace(b"C", "Ü".encode()))
    assert info.value.kind is ErrorKind.INTERNAL
    with pytest.raises(ServerError):
        build(encrypt=lambda plain: b"")


# ------------------------------------------------------------------------------------------ outer malformations


def _outer_cases():
    good = build()
    boundary = re.search(rb'boundary="([^"]+)"', good).group(1)
    delim = b"--" + boundary
    head, body = good.split(b"\r\n\r\n", 1)
    first_part_end = body.index(delim, body.index(delim) + 1)
    yield "plain-text", b"From: a@b.example\r\nSubject: hi\r\n\r\nhello\r\n", Defect.NOT_ENCRYPTED, "Content-Type"
    yield "multipart-mixed", replace_header(good, b"Content-Type",
                                            b'multipart/mixed; boundary="' + boundary + b'"'), \
        Defect.NOT_ENCRYPTED, "Content-Type"
    yield "protocol", good.replace(b'protocol="application/pgp-encrypted"',
                                   b'protocol="application/pkcs7-mime"'), Defect.WRONG_PROTOCOL, "Content-Type"
    yield "one-part", head + b"\r\n\r\n" + body[:first_part_end] + delim + b"--\r\n", Defect.ENCRYPTED_PARTS, None
    yield "version-2", good.replace(b"\r\nVersion: 1\r\n", b"\r\nVersion: 2\r\n"), Defect.NO_VERSION_PART, \
        "application/pgp-encrypted"
    yield "control-type", good.replace(b"Content-Type: application/pgp-encrypted\r\n",
                                       b"Content-Type: text/plain\r\n"), Defect.NO_VERSION_PART, \
        "application/pgp-encrypted"
    yield "data-type", good.replace(b'Content-Type: application/octet-stream; name="encrypted.asc"',
                                    b"Content-Type: text/plain"), Defect.NO_ENCRYPTED_DATA, "application/octet-stream"
    yield "truncated", good[: len(good) // 2], Defect.MULTIPART_SYNTAX, None
    yield "long-line", good.replace(b"\r\nVersion: 1", b"\r\nVersion: 1" + b"x" * 1000), Defect.LINE_TOO_LONG, None
    yield "header-syntax", b"Not a header line\r\n" + good, Defect.HEADER_SYNTAX, None
    yield "setpart-text", replace_header(good, b"X-TELEMEDICINE-SETPART", b"two"), \
        Defect.SET_HEADER_NOT_NUMERIC, "X-TELEMEDICINE-SETPART"
    yield "setpart-over-total", replace_header(good, b"X-TELEMEDICINE-SETPART", b"9"), \
        Defect.SET_PART_OUT_OF_RANGE, "X-TELEMEDICINE-SETPART"
    yield "settotal-missing", replace_header(good, b"X-TELEMEDICINE-SETTOTAL", b"").replace(
        b"X-TELEMEDICINE-SETTOTAL: \r\n", b""), Defect.SET_HEADER_MISSING, "X-TELEMEDICINE-SETTOTAL"
    yield "setid-twice", b"X-TELEMEDICINE-SETID: other\r\n" + good, Defect.SET_HEADER_DUPLICATE, \
        "X-TELEMEDICINE-SETID"


OUTER_CASES = list(_outer_cases())


@pytest.mark.parametrize("mail, defect, parameter", [c[1:] for c in OUTER_CASES], ids=[c[0] for c in OUTER_CASES])
def test_outer_malformations_raise_their_own_defect(mail, defect, parameter):
    error = defect_of(drg.parse_outer, mail)
    assert error.defect is defect and error.kind is ErrorKind.INVALID
    assert isinstance(error, ServerError) and error.message.startswith(defect.value)
    if parameter:
        assert error.parameter == parameter


def test_outer_without_set_headers_is_read_and_inner_decides():
    good = build()
    stripped = re.sub(rb"X-TELEMEDICINE-(SETID|SETPART|SETTOTAL|STUDYID): [^\r]*\r\n", b"", good)
    outer, inner = roundtrip(stripped)
    assert outer.set is None and drg.check_set(outer, inner) == inner.set


def test_outer_set_differing_from_signed_inner_is_a_security_error():
    tampered = replace_header(build(), b"X-TELEMEDICINE-SETID", b"SET-9999")
    outer, inner = roundtrip(tampered)
    error = defect_of(drg.check_set, outer, inner)
    assert error.defect is Defect.SET_MISMATCH and error.kind is ErrorKind.SECURITY


def test_read_outer_never_refuses_the_content_type():
    plain = b"From: a@b.example\r\nDisposition-Notification-To: r@b.example\r\nMessage-ID: <1@b>\r\n\r\nhi\r\n"
    outer = drg.read_outer(plain)
    assert outer.kind is drg.MailKind.OTHER and outer.mdn_to == "r@b.example" and outer.message_id == "<1@b>"
    broken_set = replace_header(build(), b"X-TELEMEDICINE-SETPART", b"x")
    assert drg.read_outer(broken_set).set is None and drg.read_outer(broken_set).kind is drg.MailKind.ENCRYPTED


# ------------------------------------------------------------------------------------------ inner malformations


def inner_entity(dicom: bytes | None = None, parts=()) -> bytes:
    return drg.build_inner(make_instance() if dicom is None else dicom, "1.2.3.dcm",
                           drg.SetInfo("S-1", 1, 2, "1.2.3"), parts)


def _dicom_part(b64: bytes, cte: bytes = b"base64") -> bytes:
    return (b"Content-Type: application/dicom; name=\"x.dcm\"\r\nContent-Transfer-Encoding: " + cte +
            b"\r\n\r\n" + b64)


def _multipart(*parts: bytes, head: bytes = b"X-TELEMEDICINE-SETID: S\r\nX-TELEMEDICINE-SETPART: 1\r\n"
               b"X-TELEMEDICINE-SETTOTAL: 1\r\n") -> bytes:
    body = b"".join(b"--B\r\n" + p + b"\r\n" for p in parts) + b"--B--\r\n"
    return b'Content-Type: multipart/mixed; boundary="B"\r\n' + head + b"\r\n" + body


DICOM_B64 = base64.encodebytes(make_instance()).replace(b"\n", b"\r\n")


def _inner_cases():
    good = inner_entity()
    yield "text-plain", b"Content-Type: text/plain\r\n\r\nhello\r\n", Defect.INNER_NOT_MULTIPART
    yield "no-dicom", good.replace(b"application/dicom", b"application/pdf"), Defect.NO_DICOM_PART
    yield "two-dicom", _multipart(_dicom_part(DICOM_B64), _dicom_part(DICOM_B64)), Defect.TWO_DICOM_PARTS
    yield "bad-base64", _multipart(_dicom_part(DICOM_B64[:200] + b"*&%" + DICOM_B64[200:])), Defect.DICOM_NOT_BASE64
    yield "bad-padding", _multipart(_dicom_part(DICOM_B64.rstrip()[:-3] + b"\r\n")), Defect.DICOM_NOT_BASE64
    yield "qp-dicom", _multipart(_dicom_part(b"DICM=00\r\n", b"quoted-printable")), Defect.DICOM_ENCODING
    yield "binary", _multipart(_dicom_part(make_instance(), b"binary")), Defect.DICOM_ENCODING
    yield "no-cte", _multipart(b'Content-Type: application/dicom\r\n\r\n' + DICOM_B64), Defect.DICOM_ENCODING
    yield "not-dicom", _multipart(_dicom_part(base64.encodebytes(os.urandom(500)))), Defect.NOT_DICOM
    yield "short", _multipart(_dicom_part(base64.encodebytes(b"DICM"))), Defect.NOT_DICOM
    yield "no-set", _multipart(_dicom_part(DICOM_B64), head=b""), Defect.SET_HEADER_MISSING
    yield "no-setpart", _multipart(_dicom_part(DICOM_B64), head=b"X-TELEMEDICINE-SETID: S\r\n"
                                   b"X-TELEMEDICINE-SETTOTAL: 1\r\n"), Defect.SET_HEADER_MISSING
    yield "settotal-text", good.replace(b"X-TELEMEDICINE-SETTOTAL: 2", b"X-TELEMEDICINE-SETTOTAL: -2"), \
        Defect.SET_HEADER_NOT_NUMERIC
    yield "setpart-zero", good.replace(b"X-TELEMEDICINE-SETPART: 1", b"X-TELEMEDICINE-SETPART: 0"), \
        Defect.SET_PART_OUT_OF_RANGE
    yield "bad-note", _multipart(_dicom_part(DICOM_B64), b"Content-Type: text/plain\r\n"
                                 b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin"), Defect.PART_ENCODING
    yield "bad-note-b64", _multipart(_dicom_part(DICOM_B64), b"Content-Type: text/plain\r\n"
                                     b"Content-Transfer-Encoding: base64\r\n\r\n@@@"), Defect.PART_ENCODING
    yield "unclosed", good[: len(good) - 10], Defect.MULTIPART_SYNTAX


INNER_CASES = list(_inner_cases())


@pytest.mark.parametrize("plain, defect", [c[1:] for c in INNER_CASES], ids=[c[0] for c in INNER_CASES])
def test_inner_malformations_raise_their_own_defect(plain, defect):
    error = defect_of(drg.parse_inner, plain)
    assert error.defect is defect and error.kind is ErrorKind.INVALID and error.parameter


def test_inner_tolerates_older_gateway_variants():
    data = make_instance()
    bare = (b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n"
            b"X-TELEMEDICINE-SETID: S\r\nX-TELEMEDICINE-SETPART: 1\r\nX-TELEMEDICINE-SETTOTAL: 1\r\n\r\n" +
            base64.encodebytes(data))
    assert drg.parse_inner(bare).dicom == data
    octet = _multipart(b'Content-Type: application/octet-stream; name="IMG 1.DCM"\r\n'
                       b"Content-Transfer-Encoding: base64\r\n\r\n" + DICOM_B64)
    assert drg.parse_inner(octet).filename == "IMG 1.DCM"
    qp_note = _multipart(_dicom_part(DICOM_B64), b"Content-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe")
    assert drg.parse_inner(qp_note).parts[0].data == "Grüße".encode()


def test_filenames_are_reduced_to_a_bare_name():
    plain = _multipart(b'Content-Type: application/dicom; name="../../etc/x.dcm"\r\n'
                       b'Content-Disposition: attachment; filename="C:\\\\tmp\\\\evil.dcm"\r\n'
                       b"Content-Transfer-Encoding: base64\r\n\r\n" + DICOM_B64)
    assert drg.parse_inner(plain).filename == "evil.dcm"


def test_every_defect_has_its_own_message():
    assert len({d.value for d in Defect}) == len(Defect.__members__)


# ------------------------------------------------------------------------------------------------- properties

_printable = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=5000), set_id=_printable, total=st.integers(1, 10_000), data=st.data(),
       subject=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=120),
       note=st.none() | st.text(max_size=300), emergency=st.booleans())
def test_build_parse_round_trip_property(body, set_id, total, data, subject, note, emergency):
    dicom = b"\0" * 128 + b"DICM" + body
    part = data.draw(st.integers(1, total))
    mail = build(dicom, set_id=set_id, set_part=part, set_total=total, subject=subject,
                 parts=[drg.note(note)] if note is not None else [], emergency=emergency)
    assert max(len(line) for line in mail.split(b"\r\n")) <= 998
    outer, inner = roundtrip(mail)
    assert inner.dicom == dicom
    assert outer.set == inner.set == drg.SetInfo(set_id, part, total, "1.2.826.0.1.3680043.8.498.2")
    assert " ".join(outer.subject.split()) == " ".join(subject.split())  # folding may change white space only
    assert outer.emergency is inner.emergency is emergency
    assert [p.data.decode() for p in inner.parts] == ([note] if note is not None else [])
