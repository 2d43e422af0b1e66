"""Unit tests for media type parsing and Accept negotiation (RFC 9110 8.3.1, 12.5.1; PS3.18 8.7)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.dicomweb.media import (
    AcceptItem,
    MediaType,
    acceptable,
    accepts,
    boundary_of,
    parse_accept,
    parse_media_type,
)
from server.errors import ErrorKind, ServerError

DCM = (("type", "application/dicom"),)

PARSE = [
    ("application/dicom", MediaType("application", "dicom")),
    ("  Application/DICOM+JSON  ", MediaType("application", "dicom+json")),
    ("*/*", MediaType("*", "*")),
    (
        'multipart/related; type="application/dicom"; boundary=0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1',
        MediaType("multipart", "related", (*DCM, ("boundary", "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"))),
    ),
    ("multipart/related; type=application/dicom", MediaType("multipart", "related", DCM)),
    ("multipart/related;type=application/dicom;", MediaType("multipart", "related", DCM)),
    (
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        MediaType("multipart", "related", (*DCM, ("transfer-syntax", "*"))),
    ),
    ('multipart/related; boundary="=_Part_0_1234.5678"',
     MediaType("multipart", "related", (("boundary", "=_Part_0_1234.5678"),))),
    ('multipart/mixed; boundary="simple boundary"',
     MediaType("multipart", "mixed", (("boundary", "simple boundary"),))),
    ("multipart/related; BOUNDARY=AbC", MediaType("multipart", "related", (("boundary", "AbC"),))),
    ('text/plain; a="x\\"y\\\\z"', MediaType("text", "plain", (("a", 'x"y\\z'),))),
    ('text/plain; a=""', MediaType("text", "plain", (("a", ""),))),
    ('text/plain; a="semi;colon, comma"', MediaType("text", "plain", (("a", "semi;colon, comma"),))),
    ("text/plain ;  a = b ; ; c=d", MediaType("text", "plain", (("a", "b"), ("c", "d")))),
    ("text/plain; charset=\"utf-8\"\t", MediaType("text", "plain", (("charset", "utf-8"),))),
]


@pytest.mark.parametrize(("value", "expected"), PARSE)
def test_parse_media_type(value: str, expected: MediaType) -> None:
    media = parse_media_type(value)
    assert media == expected
    assert parse_media_type(str(media)) == media


BAD = [
    "",
    "   ",
    "application",
    "application/",
    "/dicom",
    "appli cation/dicom",
    "application/dicom extra",
    "application/dicom; type",
    "application/dicom; =x",
    "application/dicom; a=",
    'application/dicom; a="unterminated',
    'application/dicom; a="x" y',
    'application/dicom; a=x"y',
    "application/dicom; a=b; A=c",
    "application/dicom; a=\x01",
    'application/dicom; a="\x7f"',
    'application/dicom; a="x\\',
    "application/dicom, text/plain",
]


@pytest.mark.parametrize("value", BAD)
def test_parse_media_type_rejects(value: str) -> None:
    with pytest.raises(ServerError) as info:
        parse_media_type(value)
    assert info.value.kind is ErrorKind.INVALID


def test_media_type_helpers() -> None:
    media = parse_media_type('Multipart/Related; Type="application/dicom"; boundary=xY')
    assert media.essence == "multipart/related"
    assert media.param("TYPE") == "application/dicom"
    assert media.param("missing") is None
    assert str(media) == 'multipart/related; type="application/dicom"; boundary=xY'
    assert str(media.with_param("boundary", "a b")) == 'multipart/related; type="application/dicom"; boundary="a b"'
    with_ts = media.with_param("transfer-syntax", "1.2.840.10008.1.2.1")
    assert str(with_ts).endswith("; transfer-syntax=1.2.840.10008.1.2.1")
    assert MediaType("Text", "Plain", (("A", "1"),)) == MediaType("text", "plain", (("a", "1"),))


def item(value: str, q: float = 1.0) -> AcceptItem:
    return AcceptItem(parse_media_type(value), q)


JSON_OR_XML = 'application/dicom+json, multipart/related; type="application/dicom+xml"; q=0.5'
OCTET_OR_ANY = (
    'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1, '
    'multipart/related; type="*/*"'
)
ACCEPT = [
    (None, [item("*/*")]),
    ("", [item("*/*")]),
    (" , ,", [item("*/*")]),
    ("application/dicom", [item("application/dicom")]),
    (
        OCTET_OR_ANY,
        [
            item('multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'),
            item('multipart/related; type="*/*"'),
        ],
    ),
    (
        JSON_OR_XML,
        [item("application/dicom+json"), item('multipart/related; type="application/dicom+xml"', 0.5)],
    ),
    (
        "text/html;q=0.2, a/b;q=0.9, */*;q=0, c/d;q=0.9,,",
        [item("a/b", 0.9), item("c/d", 0.9), item("text/html", 0.2), item("*/*", 0.0)],
    ),
    ('a/b; x="1,2"; q=1.000, c/d', [item('a/b; x="1,2"'), item("c/d")]),
    ("a/b;Q=0.5;ext=1", [item("a/b; ext=1", 0.5)]),
    ("a/b;q=0., c/d;q=1.", [item("c/d"), item("a/b", 0.0)]),
    ('multipart/related; type=application/dicom; transfer-syntax=*, application/json', [
        item('multipart/related; type="application/dicom"; transfer-syntax=*'),
        item("application/json"),
    ]),
]


@pytest.mark.parametrize(("header", "expected"), ACCEPT)
def test_parse_accept(header: str | None, expected: list[AcceptItem]) -> None:
    assert parse_accept(header) == expected


@pytest.mark.parametrize(
    "header", ["a/b;q=2", "a/b;q=1.5", "a/b;q=0.1234", "a/b;q=-1", "a/b;q=x", "a/b;q=.5", "a/b c/d", "a/b;q=1;q=1"]
)
def test_parse_accept_rejects(header: str) -> None:
    with pytest.raises(ServerError) as info:
        parse_accept(header)
    assert info.value.kind is ErrorKind.INVALID


ACCEPTS = [
    # header, essence, type_param, index of the expected item in parse_accept(header) or None
    (None, "application/dicom+json", None, 0),
    ("application/dicom+json", "application/dicom+json", None, 0),
    ("application/json", "application/dicom+json", None, None),
    ("application/*", "application/dicom+json", None, 0),
    ("text/*", "application/dicom+json", None, None),
    ("multipart/*", "multipart/related", "application/dicom", 0),
    ("multipart/related", "multipart/related", "application/dicom", 0),
    ('multipart/related; type="application/dicom"', "multipart/related", "application/dicom", 0),
    ('multipart/related; type="Application/DICOM"', "multipart/related", "application/dicom", 0),
    ("multipart/related; type=application/dicom", "multipart/related", "application/octet-stream", None),
    ('multipart/related; type="*/*"', "multipart/related", "application/octet-stream", 0),
    ('multipart/related; type="application/*"', "multipart/related", "application/octet-stream", 0),
    ('multipart/related; type="image/*"', "multipart/related", "application/octet-stream", None),
    (OCTET_OR_ANY, "multipart/related", "image/jpeg", 1),
    (JSON_OR_XML, "multipart/related", "application/dicom+xml", 1),
    (JSON_OR_XML, "application/dicom+xml", None, None),
    # q=0 refuses; a more specific range overrides a less specific one (RFC 9110 12.5.1)
    ("application/dicom;q=0", "application/dicom", None, None),
    ("*/*, application/dicom;q=0", "application/dicom", None, None),
    ("*/*;q=0, application/dicom", "application/dicom", None, 0),
    ("*/*;q=0.1, application/*;q=0.5", "application/dicom", None, 0),
    ('*/*, multipart/related; type="application/dicom"; q=0', "multipart/related", "application/dicom", None),
    ('*/*, multipart/related; type="application/dicom"; q=0', "multipart/related", "application/octet-stream", 0),
    ("*/*;q=0.5, application/dicom;q=0.2", "application/dicom", None, 1),
    # equally specific: the higher q wins, ties keep header order
    (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50; q=0.9, '
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "multipart/related",
        "application/dicom",
        0,
    ),
    ("a/b;x=1;q=0.5, a/b;x=2;q=0.5", "a/b", None, 0),
]


@pytest.mark.parametrize(("header", "essence", "type_param", "index"), ACCEPTS)
def test_accepts(header: str | None, essence: str, type_param: str | None, index: int | None) -> None:
    items = parse_accept(header)
    expected = None if index is None else items[index]
    assert accepts(items, essence, type_param=type_param) == expected


def test_acceptable_lists_all_in_preference_order() -> None:
    items = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5, '
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
        "*/*;q=0.1, text/html, multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.3; q=0"
    )
    got = acceptable(items, "multipart/related", type_param="application/dicom")
    assert [i.media.param("transfer-syntax") for i in got] == ["1.2.840.10008.1.2.4.50", "*", None]
    assert acceptable(parse_accept("*/*, application/dicom;q=0"), "application/dicom") == []


UUID_BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
BOUNDARIES = [
    ('multipart/related; type="application/dicom"; boundary=0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1', UUID_BOUNDARY),
    ('multipart/related; boundary="=_Part_0_1234.5678"', "=_Part_0_1234.5678"),
    ('multipart/mixed; boundary="simple boundary"', "simple boundary"),
]


@pytest.mark.parametrize(("value", "expected"), BOUNDARIES)
def test_boundary_of(value: str, expected: str) -> None:
    assert boundary_of(parse_media_type(value)) == expected


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ('multipart/related; type="application/dicom"', ErrorKind.INVALID),
        ('multipart/related; boundary=""', ErrorKind.INVALID),
        ('multipart/related; boundary="a\tb"', ErrorKind.INVALID),
        ("multipart/related; boundary=" + "x" * 201, ErrorKind.INVALID),
        ("application/dicom; boundary=x", ErrorKind.UNSUPPORTED),
    ],
)
def test_boundary_of_rejects(value: str, kind: ErrorKind) -> None:
    with pytest.raises(ServerError) as info:
        boundary_of(parse_media_type(value))
    assert info.value.kind is kind


def test_boundary_missing_message() -> None:
    with pytest.raises(ServerError, match="multipart/related without boundary"):
        boundary_of(parse_media_type("multipart/related"))


# --- Hypothesis round trip ---------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~" + string.ascii_lowercase + string.digits
TOKENS = st.text(alphabet=TCHARS, min_size=1, max_size=10)
VALUES = st.text(alphabet=string.ascii_letters + string.digits + ' \t";,\\=/()*-.é', max_size=12)


@st.composite
def media_types(draw: st.DrawFn, reserved: tuple[str, ...] = ()) -> MediaType:
    names = draw(st.lists(TOKENS.filter(lambda n: n not in reserved), unique=True, max_size=4))
    params = tuple((name, draw(VALUES)) for name in names)
    return MediaType(draw(TOKENS), draw(TOKENS), params)


@given(media_types())
def test_round_trip(media: MediaType) -> None:
    assert parse_media_type(str(media)) == media


WEIGHTS = st.sampled_from([0.0, 0.125, 0.5, 1.0])


@given(st.lists(st.tuples(media_types(reserved=("q",)), WEIGHTS), min_size=1, max_size=4))
def test_accept_round_trip(ranges: list[tuple[MediaType, float]]) -> None:
    header = ", ".join(f"{m}; q={q:g}" for m, q in ranges)
    expected = sorted((AcceptItem(m, q) for m, q in ranges), key=lambda i: -i.q)
    assert parse_accept(header) == expected
