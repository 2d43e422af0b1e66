"""RFC 2046 5.2.2 message/partial: split at line ends within a limit, join in any order (server/mail/partial.py)."""

from __future__ import annotations

import email
import email.policy
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import ErrorKind, ServerError
from server.mail import drg, partial
from server.mail.mime import Defect, MailError, split_entity
from tests.dicomdata import make_instance, sample_bytes
from tests.unit.test_drg_mail import build, fake_decrypt


@pytest.fixture(scope="module")
def mail() -> bytes:
    return build(sample_bytes("CT_small.dcm"), emergency=True)


def defect_of(fn, *args) -> MailError:
    with pytest.raises(MailError) as info:
        fn(*args)
    return info.value


def test_a_mail_within_the_limit_is_not_split(mail):
    assert partial.split(mail, len(mail)) == [mail]
    assert partial.fragment_info(mail) is None


def test_fragments_respect_the_limit_and_cut_at_line_ends(mail):
    fragments = partial.split(mail, 8000)
    assert len(fragments) > 3
    assert all(len(f) <= 8000 for f in fragments)
    for fragment in fragments[:-1]:
        assert split_entity(fragment).body.endswith(b"\r\n")
    assert b"".join(split_entity(f).body for f in fragments) == mail  # the encapsulated message is the mail


def test_fragment_headers_rfc2046_and_drg(mail):
    fragments = partial.split(mail, 8000)
    total = len(fragments)
    original = drg.parse_outer(mail)
    frag_id = partial.fragment_info(fragments[0]).id
    assert re.fullmatch(r"[0-9a-f]{32}@site-a\.example", frag_id)
    ids = set()
    for number, fragment in enumerate(fragments, 1):
        assert partial.fragment_info(fragment) == (frag_id, number, total)
        outer = drg.parse_outer(fragment)
        assert outer.kind is drg.MailKind.PARTIAL and outer.fragment == partial.Fragment(frag_id, number, total)
        assert outer.subject == f"DICOM-eMail ({number}/{total})"
        assert outer.set == original.set and outer.mdn_to == original.mdn_to and outer.emergency
        assert outer.sender == original.sender and outer.recipients == original.recipients
        assert outer.date == original.date
        assert outer.message_id != original.message_id
        ids.add(outer.message_id)
        head = fragment.split(b"\r\n\r\n", 1)[0]
        assert max(len(line) for line in head.split(b"\r\n")) <= 78
        assert b"Content-Transfer-Encoding" not in head and b"multipart/encrypted" not in head
        msg = email.message_from_bytes(fragment, policy=email.policy.default)
        assert msg.get_content_type() == "message/partial" and not msg.defects
        assert (msg.get_param("id"), msg.get_param("number"), msg.get_param("total")) == \
            (frag_id, str(number), str(total))
    assert len(ids) == total


def test_join_in_any_order_restores_the_mail_byte_for_byte(mail):
    fragments = partial.split(mail, 5000)
    for seed in range(5):
        shuffled = fragments[:]
        random.Random(seed).shuffle(shuffled)
        joined = partial.join(shuffled)
        assert joined == mail
    outer = drg.parse_outer(partial.join(fragments))
    assert drg.parse_inner(fake_decrypt(outer.encrypted)).dicom == sample_bytes("CT_small.dcm")


def test_identical_duplicates_are_tolerated(mail):
    fragments = partial.split(mail, 5000)
    assert partial.join(fragments + fragments[1:3] + [fragments[0]]) == mail


def test_duplicate_with_other_content_is_refused(mail):
    fragments = partial.split(mail, 5000)
    head, body = fragments[1].split(b"\r\n\r\n", 1)
    forged = head + b"\r\n\r\n" + body.replace(b"A", b"B", 1)
    error = defect_of(partial.join, fragments + [forged])
    assert error.defect is Defect.FRAGMENT_CONFLICT and error.parameter == "number"


def test_missing_fragments_are_named(mail):
    fragments = partial.split(mail, 5000)
    error = defect_of(partial.join, fragments[:2] + fragments[4:])
    assert error.defect is Defect.FRAGMENT_MISSING and "[3, 4]" in error.message


def test_without_the_last_fragment_the_total_is_unknown(mail):
    fragments = partial.split(mail, 5000)
    no_totals = [re.sub(rb";\r\n total=\d+", b"", f) for f in fragments]
    assert partial.fragment_info(no_totals[0]).total is None
    error = defect_of(partial.join, no_totals[:-1])
    assert error.defect is Defect.FRAGMENT_MISSING and error.parameter == "total"
    # RFC 2046 5.2.2: total is required only on the last fragment
    assert partial.join(no_totals[:-1] + fragments[-1:]) == mail


def test_fragments_of_different_messages_are_refused(mail):
    ours = partial.split(mail, 5000)
    other = partial.split(build(sample_bytes("CT_small.dcm")), 5000)
    error = defect_of(partial.join, ours[:1] + other[1:])
    assert error.defect is Defect.FRAGMENT_ID_MISMATCH


def test_totals_must_agree(mail):
    fragments = partial.split(mail, 5000)
    changed = re.sub(rb"total=\d+", b"total=99", fragments[0])
    assert defect_of(partial.join, [changed] + fragments[1:]).defect is Defect.FRAGMENT_TOTAL_MISMATCH


@pytest.mark.parametrize("params", [b'number=1; total=2', b'id="x"; total=2', b'id="x"; number=one; total=2',
                                    b'id="x"; number=3; total=2', b'id="x"; number=0; total=2',
                                    b'id=""; number=1; total=2', b'id="x"; number=1; total=-2'])
def test_bad_partial_parameters(params):
    raw = b"Content-Type: message/partial; " + params + b"\r\n\r\nbody\r\n"
    assert defect_of(partial.fragment_info, raw).defect is Defect.FRAGMENT_PARAMETERS


def test_number_beyond_the_agreed_total_is_refused(mail):
    fragments = partial.split(mail, 5000)
    stray = re.sub(rb"number=\d+;\r\n total=\d+", b"number=500", fragments[1])
    assert defect_of(partial.join, fragments + [stray]).defect is Defect.FRAGMENT_PARAMETERS


def test_join_refuses_other_mails_and_nothing(mail):
    assert defect_of(partial.join, [mail]).defect is Defect.NOT_A_FRAGMENT
    assert defect_of(partial.join, []).defect is Defect.FRAGMENT_MISSING


def test_limits_too_small_are_refused(mail):
    with pytest.raises(ServerError) as info:
        partial.split(mail, 300)
    assert info.value.kind is ErrorKind.INVALID and info.value.parameter == "max_bytes"
    long_line = b"From: a@b.example\r\nSubject: x\r\n\r\n" + b"y" * 3000 + b"\r\n"
    with pytest.raises(ServerError):
        partial.split(long_line, 2000)


def test_fragments_with_bare_lf_still_join(mail):
    fragments = [f.replace(b"\r\n", b"\n") for f in partial.split(mail, 6000)]
    assert partial.join(fragments) == mail


def test_transport_headers_before_the_first_fragment_are_kept_rfc2046_rule_1(mail):
    fragments = partial.split(mail, 6000)
    fragments[0] = b"Received: from mx.site-a.example by mx.site-b.example\r\n" + fragments[0]
    joined = partial.join(fragments)
    assert joined == b"Received: from mx.site-a.example by mx.site-b.example\r\n" + mail


RFC2046_PART1 = b"""X-Weird-Header-1: Foo
From: Bill@host.com
To: joe@otherhost.com
Date: Fri, 26 Mar 1993 12:59:38 -0500 (EST)
Subject: Audio mail (part 1 of 2)
Message-ID: <id1@host.com>
MIME-Version: 1.0
Content-type: message/partial; id="ABC@host.com";
     number=1; total=2

X-Weird-Header-1: Bar
X-Weird-Header-2: Hello
Message-ID: <anotherid@foo.com>
Subject: Audio mail
MIME-Version: 1.0
Content-type: audio/basic
Content-transfer-encoding: base64

  ... first half of encoded audio data goes here ...
"""
RFC2046_PART2 = b"""From: Bill@host.com
To: joe@otherhost.com
Date: Fri, 26 Mar 1993 12:59:38 -0500 (EST)
Subject: Audio mail (part 2 of 2)
MIME-Version: 1.0
Message-ID: <id2@host.com>
Content-type: message/partial;
     id="ABC@host.com"; number=2; total=2

  ... second half of encoded audio data goes here ...
"""
RFC2046_JOINED = b"""X-Weird-Header-1: Foo
From: Bill@host.com
To: joe@otherhost.com
Date: Fri, 26 Mar 1993 12:59:38 -0500 (EST)
Message-ID: <anotherid@foo.com>
Subject: Audio mail
MIME-Version: 1.0
Content-type: audio/basic
Content-transfer-encoding: base64

  ... first half of encoded audio data goes here ...
  ... second half of encoded audio data goes here ...
"""


def test_the_rfc2046_example_joins_as_the_rfc_says():
    crlf = [x.replace(b"\n", b"\r\n") for x in (RFC2046_PART1, RFC2046_PART2, RFC2046_JOINED)]
    assert partial.join([crlf[1], crlf[0]]) == crlf[2]


# ------------------------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 40_000), limit=st.integers(1_500, 30_000), seed=st.integers(0, 2**32),
       subject=st.sampled_from(["DICOM-eMail", "Befund Müller – Notfall", ""]))
def test_split_shuffle_join_is_identity(size, limit, seed, subject):
    rnd = random.Random(seed)
    dicom = b"\0" * 128 + b"DICM" + rnd.randbytes(size)
    mail = build(dicom, subject=subject)
    fragments = partial.split(mail, limit)
    assert all(len(f) <= limit for f in fragments)
    if len(fragments) == 1:
        assert fragments == [mail] and len(mail) <= limit
        return
    assert [partial.fragment_info(f).number for f in fragments] == list(range(1, len(fragments) + 1))
    rnd.shuffle(fragments)
    fragments += rnd.sample(fragments, k=2)  # identical re-deliveries
    assert partial.join(fragments) == mail


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200), max_size=300),
       limit=st.integers(900, 5_000))
def test_any_text_mail_keeps_its_body_exactly(lines, limit):
    mail = (b"Message-ID: <m@x.example>\r\nFrom: a@x.example\r\nX-Other: 1\r\nSubject: s\r\n"
            b"Content-Type: text/plain\r\n\r\n" + b"".join(s.encode() + b"\r\n" for s in lines))
    fragments = partial.split(mail, limit)
    assert all(len(f) <= limit for f in fragments)
    joined = partial.join(fragments[::-1]) if len(fragments) > 1 else fragments[0]
    assert split_entity(joined).body == split_entity(mail).body
    if len(fragments) > 1:  # RFC 2046 5.2.2: routing fields from the fragment, special ones from inside
        assert joined.startswith(b"From: a@x.example\r\nX-Other: 1\r\nDate: ")
        assert b"Message-ID: <m@x.example>\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\n" in joined


def test_make_instance_mail_of_many_fragments():
    mail = build(make_instance(size=128))
    fragments = partial.split(mail, 2000)
    assert len(fragments) > 20
    assert partial.join(fragments[::-1]) == mail
