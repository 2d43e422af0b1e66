"""mime.check_lines without splitting: the same verdict as the plain split over CRLF, at the 998-character edge,
with bare LF/CR, without a final line end, on a 1 MB mail of 76-column lines."""

from __future__ import annotations

import binascii
import random

import pytest

from server.mail.mime import CRLF, MAX_LINE, Defect, MailError, check_lines


def split_verdict(raw: bytes) -> bool:
    return not (len(raw) > MAX_LINE and max(map(len, raw.split(CRLF))) > MAX_LINE)


def verdict(raw: bytes) -> bool:
    try:
        check_lines(raw)
    except MailError as exc:
        assert exc.defect is Defect.LINE_TOO_LONG
        return False
    return True


@pytest.mark.parametrize("length", [0, 1, 997, 998, 999, 1000, 2000])
@pytest.mark.parametrize("where", ["first", "middle", "last", "last-no-crlf"])
def test_a_line_at_the_edge(length, where):
    line = b"a" * length
    short = [b"x" * 76] * 20
    lines = {"first": [line] + short, "middle": short + [line] + short, "last": short + [line],
             "last-no-crlf": short + [line]}[where]
    raw = CRLF.join(lines) + (b"" if where == "last-no-crlf" else CRLF)
    assert verdict(raw) == split_verdict(raw) == (length <= MAX_LINE)


def test_random_texts_get_the_split_verdict():
    rnd = random.Random(7)
    for _ in range(3000):
        parts = []
        for _ in range(rnd.randint(0, 6)):
            n = rnd.choice([0, 1, 500, 996, 997, 998, 999, 1000, 1001, 1500, rnd.randint(0, 2100)])
            parts.append(bytes(rnd.choice(b"ab\r\n") if rnd.random() < 0.01 else 97 for _ in range(n)))
        raw = rnd.choice([CRLF, b"\n", b"\r", b"\r\r\n"]).join(parts) + rnd.choice([b"", CRLF, b"\r", b"\n"])
        assert verdict(raw) == split_verdict(raw), [len(p) for p in parts]


def test_a_1_mb_armored_body():
    encoded = binascii.b2a_base64(random.Random(1).randbytes(750_000), newline=False)
    raw = b"".join(encoded[i:i + 76] + CRLF for i in range(0, len(encoded), 76))
    check_lines(raw)
    with pytest.raises(MailError):
        check_lines(raw[:500_000] + b"y" * 999 + raw[500_000:])
