"""Unit tests for the streaming multipart/related parser and writer (RFC 2046 5.1.1, RFC 2387)."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server.dicomweb.multipart import (
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    amultipart_chunks,
    close_delimiter,
    multipart_chunks,
    new_boundary,
    part_header,
)
from server.errors import ErrorKind, ServerError

B = "bound"
Parts = list[tuple[dict[str, str], bytes]]


def collect(events: list[PartStart | PartData | PartEnd]) -> Parts:
    """Fold an event stream into (headers, body) pairs, checking its shape."""
    parts: Parts = []
    body: list[bytes] | None = None
    for event in events:
        if isinstance(event, PartStart):
            assert body is None, "PartStart inside a part"
            parts.append((event.headers, b""))
            body = []
        elif isinstance(event, PartData):
            assert body is not None, "PartData outside a part"
            assert event.data, "empty PartData"
            body.append(event.data)
        else:
            assert body is not None, "PartEnd outside a part"
            parts[-1] = (parts[-1][0], b"".join(body))
            body = None
    assert body is None, "part not ended"
    return parts


def parse(raw: bytes, boundary: str = B, sizes: list[int] | None = None, **kwargs: int) -> Parts:
    """Feed raw in chunks (all at once, or cycling through sizes), close, and return the parts."""
    parser = MultipartParser(boundary, **kwargs)
    events = []
    pos, i = 0, 0
    while pos < len(raw):
        size = len(raw) if not sizes else sizes[i % len(sizes)]
        events += parser.feed(raw[pos : pos + size])
        pos, i = pos + size, i + 1
    parser.close()
    return collect(events)


def parse_all_ways(raw: bytes, boundary: str = B, **kwargs: int) -> Parts:
    """Parse whole, byte by byte and in odd chunk sizes; all must agree."""
    whole = parse(raw, boundary, **kwargs)
    for sizes in ([1], [2], [3, 1, 7], [len(boundary) + 3]):
        assert parse(raw, boundary, sizes, **kwargs) == whole
    return whole


CT = {"content-type": "application/dicom"}

VALID = [
    ("minimal", b"--bound\r\n\r\nabc\r\n--bound--", [({}, b"abc")]),
    ("headers", b"--bound\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--bound--\r\n", [(CT, b"abc")]),
    ("header case and spaces", b"--bound\r\nCONTENT-type:   application/dicom  \r\n\r\nx\r\n--bound--", [(CT, b"x")]),
    ("duplicate header last wins", b"--bound\r\nA: 1\r\na: 2\r\n\r\nx\r\n--bound--", [({"a": "2"}, b"x")]),
    ("empty header value", b"--bound\r\nA:\r\n\r\nx\r\n--bound--", [({"a": ""}, b"x")]),
    ("folded header", b"--bound\r\nA: 1\r\n 2\r\n\r\nx\r\n--bound--", [({"a": "1 2"}, b"x")]),
    ("two parts", b"--bound\r\n\r\na\r\n--bound\r\n\r\nb\r\n--bound--", [({}, b"a"), ({}, b"b")]),
    ("empty body", b"--bound\r\n\r\n\r\n--bound--", [({}, b"")]),
    ("empty bodies", b"--bound\r\nA: 1\r\n\r\n\r\n--bound\r\n\r\n\r\n--bound--", [({"a": "1"}, b""), ({}, b"")]),
    ("preamble", b"This is the preamble.\r\nIt is ignored.\r\n--bound\r\n\r\nx\r\n--bound--", [({}, b"x")]),
    ("preamble with fake", b"--boundX\r\n--bound \r\n\r\nx\r\n--bound--", [({}, b"x")]),
    ("epilogue", b"--bound\r\n\r\nx\r\n--bound--\r\nepilogue\r\n--bound\r\n\r\nnot a part", [({}, b"x")]),
    ("padding", b"--bound \t \r\n\r\nx\r\n--bound\t\r\n\r\ny\r\n--bound--  \r\n", [({}, b"x"), ({}, b"y")]),
    ("LF-only headers", b"--bound\nContent-Type: application/dicom\nA: b\n\nx\r\n--bound--", [(CT | {"a": "b"}, b"x")]),
    ("LF-only headers, CRLFs in body", b"--bound\nA: 1\n\nx\r\n\r\ny\r\n--bound--", [({"a": "1"}, b"x\r\n\r\ny")]),
    ("LF-only headers, body starts with CRLF", b"--bound\nA: 1\n\n\r\nx\r\n--bound--", [({"a": "1"}, b"\r\nx")]),
    ("LF-only empty header block", b"--bound\n\nx\r\n--bound--", [({}, b"x")]),
    ("mixed line ends", b"--bound\r\nA: 1\n\r\nx\r\n--bound--", [({"a": "1"}, b"x")]),
    (
        "boundary prefix in body",
        b"--bound\r\n\r\na\r\n--boun\r\n--bounc\r\n--bound--",
        [({}, b"a\r\n--boun\r\n--bounc")],
    ),
    (
        "boundary then junk in body",
        b"--bound\r\n\r\na\r\n--boundary\r\n--bound-x\r\n--bound--",
        [({}, b"a\r\n--boundary\r\n--bound-x")],
    ),
    ("bare boundary in body", b"--bound\r\n\r\n--bound\nx--bound\r\n\r\n--bound--", [({}, b"--bound\nx--bound\r\n")]),
    ("CR without LF after boundary", b"--bound\r\n\r\na\r\n--bound\rb\r\n--bound--", [({}, b"a\r\n--bound\rb")]),
    ("body of CRLFs", b"--bound\r\n\r\n\r\n\r\n\r\n\r\n--bound--", [({}, b"\r\n\r\n\r\n")]),
    ("body ends with CR", b"--bound\r\n\r\nab\r\r\n--bound--", [({}, b"ab\r")]),
    ("body with dashes", b"--bound\r\n\r\n--\r\n----bound\r\n--bound--", [({}, b"--\r\n----bound")]),
    ("LF delimiter line", b"--bound\n\nx\r\n--bound\n\ny\r\n--bound--", [({}, b"x"), ({}, b"y")]),
    ("close without CRLF", b"--bound\r\n\r\nx\r\n--bound--", [({}, b"x")]),
    (
        "padding limit",
        b"--bound\r\n\r\nx\r\n--bound" + b" " * 65 + b"\r\n--bound--",
        [({}, b"x\r\n--bound" + b" " * 65)],
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [pytest.param(r, e, id=i) for i, r, e in VALID])
def test_valid_bodies(raw: bytes, expected: Parts) -> None:
    assert parse_all_ways(raw) == expected


INVALID = [
    ("empty", b""),
    ("no delimiter", b"just some text"),
    ("truncated in body", b"--bound\r\n\r\nabc"),
    ("truncated in headers", b"--bound\r\nContent-Type: appl"),
    ("truncated after part delimiter", b"--bound\r\n\r\nabc\r\n--bound\r\n"),
    ("truncated at boundary", b"--bound\r\n\r\nabc\r\n--bound"),
    ("truncated at one dash", b"--bound\r\n\r\nabc\r\n--bound-"),
    ("no parts", b"--bound--\r\n"),
    ("no parts with preamble", b"preamble\r\n--bound--"),
    ("header without colon", b"--bound\r\nContent-Type application/dicom\r\n\r\nx\r\n--bound--"),
    ("header with empty name", b"--bound\r\n: x\r\n\r\nx\r\n--bound--"),
    ("header name with space", b"--bound\r\nContent Type: x\r\n\r\nx\r\n--bound--"),
]


@pytest.mark.parametrize("raw", [pytest.param(r, id=i) for i, r in INVALID])
def test_invalid_bodies(raw: bytes) -> None:
    for sizes in (None, [1]):
        with pytest.raises(ServerError) as info:
            parse(raw, sizes=sizes)
        assert info.value.kind is ErrorKind.INVALID


@pytest.mark.parametrize("sizes", [None, [1], [1000]])
def test_oversized_header_block(sizes: list[int] | None) -> None:
    big = b"--bound\r\nX: " + b"a" * 5000 + b"\r\n\r\nx\r\n--bound--"
    assert parse(big, sizes=sizes, max_header_bytes=6000) == [({"x": "a" * 5000}, b"x")]
    with pytest.raises(ServerError) as info:
        parse(big, sizes=sizes, max_header_bytes=4096)
    assert info.value.kind is ErrorKind.INVALID


def test_oversized_header_block_raises_before_end() -> None:
    parser = MultipartParser(B, max_header_bytes=100)
    parser.feed(b"--bound\r\n")
    with pytest.raises(ServerError) as info:
        for _ in range(10):
            parser.feed(b"X: " + b"a" * 50 + b"\r\n")
    assert info.value.kind is ErrorKind.INVALID


def test_header_block_at_exact_limit() -> None:
    block = b"X: " + b"a" * 95 + b"\r\n"  # 100 bytes including its CRLF
    raw = b"--bound\r\n" + block + b"\r\nx\r\n--bound--"
    assert parse(raw, max_header_bytes=100, sizes=[1]) == [({"x": "a" * 95}, b"x")]
    with pytest.raises(ServerError):
        parse(raw, max_header_bytes=99)


def test_max_parts() -> None:
    raw = b"--bound\r\n\r\n\r\n" * 3 + b"--bound--"
    assert len(parse(raw, max_parts=3)) == 3
    with pytest.raises(ServerError) as info:
        parse(raw, max_parts=2)
    assert info.value.kind is ErrorKind.TOO_LARGE


@pytest.mark.parametrize("boundary", ["", "a\r\nb", "x" * 201, "gr\u00fc\u00dfe"])
def test_bad_boundary(boundary: str) -> None:
    with pytest.raises(ServerError) as info:
        MultipartParser(boundary)
    assert info.value.kind is ErrorKind.INVALID


def test_complete_and_ignores_after_close() -> None:
    parser = MultipartParser(B)
    assert parser.feed(b"--bound\r\n\r\nx\r\n--bou") == [PartStart({}), PartData(b"x")]
    assert not parser.complete
    assert parser.feed(b"nd--") == [PartEnd()]
    assert parser.complete
    assert parser.parts == 1
    assert parser.feed(b"\r\n--bound\r\n\r\nmore\r\n--bound--") == []
    parser.close()


def test_tail_is_small_and_data_streams() -> None:
    """Large parts are emitted as they arrive; only a short tail is held back."""
    parser = MultipartParser(B)
    parser.feed(b"--bound\r\n\r\n")
    chunk = bytes(range(256)) * 4096  # 1 MiB, contains CR and LF
    out = parser.feed(chunk)
    emitted = sum(len(e.data) for e in out if isinstance(e, PartData))
    assert len(chunk) - emitted <= len(B) + 4
    out = parser.feed(b"\r\n--bound--")
    assert out[-1] == PartEnd()


BIG = bytes(range(256)) * 8  # 2 KiB, contains CR and LF but no delimiter


def held(tail: bytes) -> bytes:
    """A first feed: one part started, a large body, then tail (which the parser must hold back)."""
    return b"--bound\r\n\r\n" + BIG + tail


END = b"\r\n--bound--"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(held(b"\r"), b"\n--bounX" + BIG + END, id="fake delimiter across seam"),
        pytest.param(held(b"\r\n--bo"), b"und\r\nA: 1\r\n\r\n" + BIG + END, id="delimiter and headers in seam"),
        pytest.param(held(b"\r\n--bound"), b"\r\nA: " + b"x" * 600 + b"\r\n\r\n" + BIG + END, id="headers beyond seam"),
        pytest.param(held(b"\r\n--bound\r\nA: 1"), b"\r\n\r\n" + BIG + END, id="header block open in tail"),
        pytest.param(held(b"\r\n--bound-"), b"-\r\n" + BIG, id="close delimiter in seam"),
        pytest.param(b"pre\r\n--bo", b"und\r\n\r\n" + BIG + END, id="first delimiter across seam"),
        pytest.param(held(b"\r\n--bound" + b" " * 60), b" \r\n\r\n" + BIG + END, id="padding across seam"),
    ],
)
def test_big_chunk_after_held_tail(first: bytes, second: bytes) -> None:
    """A large feed after a held tail takes the in-place path; it must agree with byte-wise parsing."""
    raw = first + second
    expected = parse(raw, sizes=[1])
    assert parse(raw, sizes=[len(first), len(second)]) == expected
    assert parse(raw, sizes=[len(first) - 1, len(second) + 1]) == expected
    assert parse(raw) == expected


def random_body(rnd: random.Random) -> bytes:
    """A body dense in CR, LF, dashes and delimiter fragments for boundary "bound"."""
    atoms = [b"\r", b"\n", b"\r\n", b"-", b"--", b" ", b"bound", b"\r\n--", b"\r\n--b", b"\r\n--boun", b"\r\n--bounx"]
    pieces = [rnd.choice(atoms) if rnd.random() < 0.7 else rnd.randbytes(rnd.randint(0, 300)) for _ in range(200)]
    return b"".join(pieces[: rnd.randint(0, 200)])


def test_large_chunks_fuzz() -> None:
    """Random big bodies fed in a mix of tiny and large chunks."""
    rnd = random.Random(1234)
    delimiter_line = re.compile(rb"\r\n--bound(--|[ \t]*\r?\n)")
    for _ in range(200):
        parts = [(CT if rnd.random() < 0.5 else {}, random_body(rnd)) for _ in range(rnd.randint(1, 4))]
        if any(delimiter_line.search(b"\r\n" + body + b"\r\n") for _, body in parts):
            continue
        raw = b"".join(multipart_chunks(B, [(h, [b]) for h, b in parts]))
        sizes = [rnd.choice([1, 2, 5, 17, 300, 700, 4096, 20000]) for _ in range(rnd.randint(1, 8))]
        assert parse(raw, sizes=sizes) == parts


def test_quoted_style_boundaries() -> None:
    for boundary in ("simple boundary", "=_Part_0_1234.5678", "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"):
        raw = b"".join(multipart_chunks(boundary, [(CT, [b"a", b"b"]), ({}, b"c")]))
        assert parse_all_ways(raw, boundary) == [(CT, b"ab"), ({}, b"c")]


def test_writer_exact_bytes() -> None:
    raw = b"".join(multipart_chunks(B, [({"Content-Type": "application/dicom"}, [b"ab", b"", b"c"]), ({}, [])]))
    assert raw == (
        b"--bound\r\nContent-Type: application/dicom\r\n\r\nabc\r\n"
        b"--bound\r\n\r\n\r\n"
        b"--bound--\r\n"
    )
    assert part_header(B, {"A": "1"}) == b"--bound\r\nA: 1\r\n\r\n"
    assert close_delimiter(B) == b"--bound--\r\n"


@pytest.mark.parametrize("headers", [{"A": "1\r\nB: 2"}, {"A:B": "1"}, {"": "1"}, {"A B": "1"}])
def test_writer_refuses_header_injection(headers: dict[str, str]) -> None:
    with pytest.raises(ServerError) as info:
        list(multipart_chunks(B, [(headers, [b"x"])]))
    assert info.value.kind is ErrorKind.INTERNAL


def test_async_writer_matches_sync() -> None:
    parts = [({"Content-Type": "application/dicom"}, [b"ab", b"c"]), ({"X": "y"}, [b"", b"d"]), ({}, [b"\r\n--bound"])]

    async def body(chunks: list[bytes]):  # noqa: ANN202 - async generator
        for chunk in chunks:
            yield chunk

    async def aparts():  # noqa: ANN202 - async generator
        for i, (headers, chunks) in enumerate(parts):
            yield headers, (body(chunks) if i % 2 == 0 else chunks)

    async def run() -> bytes:
        return b"".join([c async for c in amultipart_chunks(B, aparts())])

    assert asyncio.run(run()) == b"".join(multipart_chunks(B, parts))


def test_new_boundary() -> None:
    seen = {new_boundary() for _ in range(100)}
    assert len(seen) == 100
    assert all(len(b) == 32 and b.isalnum() for b in seen)


# --- Hypothesis round trip ---------------------------------------------------------------------------

HEADER_NAMES = st.sampled_from(["content-type", "content-location", "content-id", "x-a", "x-b"])
HEADER_VALUES = st.text(alphabet="abc/;=\"' -._:", max_size=12).map(str.strip)
BOUNDARIES = st.sampled_from(["b", "bound", "=_Part_0_1.2", "simple boundary", new_boundary()])


@st.composite
def bodies(draw: st.DrawFn, boundary: str) -> bytes:
    """Binary bodies rich in CR, LF, dashes and pieces of the boundary."""
    atoms = st.one_of(
        st.sampled_from([b"\r", b"\n", b"\r\n", b"-", b"--", b" ", b"\t"]),
        st.sampled_from([boundary[:k].encode() for k in range(len(boundary) + 1)]),
        st.binary(max_size=20),
        st.binary(min_size=200, max_size=2000),
    )
    return b"".join(draw(st.lists(atoms, max_size=30)))


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, Parts]:
    boundary = draw(BOUNDARIES)
    parts = draw(
        st.lists(
            st.tuples(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3), bodies(boundary)),
            min_size=1,
            max_size=5,
        )
    )
    # A sender must pick a boundary that does not form a delimiter line in any part (RFC 2046 5.1.1); the
    # CRLF before the body ends the header block, the one after it starts the next delimiter.
    delimiter_line = re.compile(re.escape(b"\r\n--" + boundary.encode()) + rb"(--|[ \t]*\r?\n)")
    assume(not any(delimiter_line.search(b"\r\n" + body + b"\r\n") for _, body in parts))
    return boundary, parts


CHUNK_SIZES = st.integers(min_value=1, max_value=64) | st.integers(min_value=300, max_value=3000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(messages(), st.lists(CHUNK_SIZES, min_size=1, max_size=20), st.randoms())
def test_round_trip(message: tuple[str, Parts], sizes: list[int], rnd: random.Random) -> None:
    boundary, parts = message
    chunks = list(multipart_chunks(boundary, [(h, [b[: len(b) // 2], b[len(b) // 2 :]]) for h, b in parts]))
    raw = b"".join(chunks)
    preamble = rnd.choice([b"", b"preamble\r\n", b"\r\n"])
    epilogue = rnd.choice([b"", b"epilogue", b"\r\n--" + boundary.encode() + b"\r\n\r\nignored"])
    assert parse(preamble + raw + epilogue, boundary, sizes) == parts
    assert parse(raw, boundary, [1]) == parts
