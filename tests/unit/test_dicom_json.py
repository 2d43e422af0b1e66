"""server.dicom.json: DICOM JSON Model (PS3.18 F.2) encoder and decoder."""

from __future__ import annotations

import base64
import json
import math
import string
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import server.dicom.json as dj
from server.dicom.json import (
    dataset_to_json,
    ds_to_json,
    dumps,
    float_to_json,
    is_to_json,
    json_to_dataset,
    pn_from_json,
    pn_to_json,
    swap_bytes,
)
from server.errors import ErrorKind, ServerError


def no_bulk(tag_path, elem):
    return None


def encode(vr: str, value, tag: int = 0x00091010) -> dict:
    """The JSON attribute object of one element (a private tag keeps the VR free)."""
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add(DataElement(tag, vr, value))
    return dataset_to_json(ds, no_bulk)[f"{tag:08X}"]


def roundtrip(obj: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dataset_to_json(json_to_dataset(json.loads(dumps(obj))), no_bulk)


# --------------------------------------------------------------------------------------------------
# per VR (PS3.18 F.2.2, F.2.3, F.2.5, F.2.7)

CASES = [
    # strings: split at backslash, stripped, empty values null
    ("AE", "  STORESCP ", {"Value": ["STORESCP"]}),
    ("AS", "045Y", {"Value": ["045Y"]}),
    ("CS", ["ORIGINAL", "PRIMARY"], {"Value": ["ORIGINAL", "PRIMARY"]}),
    ("CS", "A\\\\B", {"Value": ["A", None, "B"]}),
    ("DA", "20240115", {"Value": ["20240115"]}),
    ("DT", "20240115103000.5+0100", {"Value": ["20240115103000.5+0100"]}),
    ("TM", "103000 ", {"Value": ["103000"]}),
    ("LO", " Klinikum Nord ", {"Value": ["Klinikum Nord"]}),
    ("SH", "ACC-1", {"Value": ["ACC-1"]}),
    ("UI", "1.2.840.10008.1.2\x00", {"Value": ["1.2.840.10008.1.2"]}),
    ("UC", ["a ", " b"], {"Value": ["a", " b"]}),
    # text: one value, backslash kept, leading spaces significant
    ("LT", "  line1\r\nline2\\x  ", {"Value": ["  line1\r\nline2\\x"]}),
    ("ST", "a\\b", {"Value": ["a\\b"]}),
    ("UT", "Befund: o.B. ", {"Value": ["Befund: o.B."]}),
    ("UR", "http://host/x ", {"Value": ["http://host/x"]}),
    # person names
    ("PN", "Müller^Jürgen", {"Value": [{"Alphabetic": "Müller^Jürgen"}]}),
    ("PN", "Yamada^Tarou=山田^太郎=やまだ^たろう",
     {"Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]}),
    ("PN", "=山田^太郎", {"Value": [{"Ideographic": "山田^太郎"}]}),
    ("PN", ["A^B", "C^D"], {"Value": [{"Alphabetic": "A^B"}, {"Alphabetic": "C^D"}]}),
    # numbers
    ("IS", "42", {"Value": [42]}),
    ("IS", ["-1", "+7"], {"Value": [-1, 7]}),
    ("DS", "1.5", {"Value": [1.5]}),
    ("DS", "512", {"Value": [512.0]}),
    ("DS", ["1e3", "-0.25"], {"Value": [1000.0, -0.25]}),
    ("US", 5, {"Value": [5]}),
    ("US", [1, 65535], {"Value": [1, 65535]}),
    ("SS", -5, {"Value": [-5]}),
    ("UL", 4294967295, {"Value": [4294967295]}),
    ("SL", -2147483648, {"Value": [-2147483648]}),
    ("UV", 2**64 - 1, {"Value": [2**64 - 1]}),
    ("SV", -(2**63), {"Value": [-(2**63)]}),
    ("FL", 0.5, {"Value": [0.5]}),
    ("FD", 1 / 3, {"Value": [1 / 3]}),
    ("FD", [math.nan, math.inf, -math.inf], {"Value": ["NaN", "Infinity", "-Infinity"]}),
    ("AT", 0x00100010, {"Value": ["00100010"]}),
    ("AT", [0x00100010, 0x7FE00010], {"Value": ["00100010", "7FE00010"]}),
    # binary
    ("OB", b"\x01\x02", {"InlineBinary": "AQI="}),
    ("OW", b"\x01\x02\x03\x04", {"InlineBinary": "AQIDBA=="}),
    ("OF", b"\x00\x00\x80\x3f", {"InlineBinary": "AACAPw=="}),
    ("OD", bytes(8), {"InlineBinary": "AAAAAAAAAAA="}),
    ("OL", bytes(4), {"InlineBinary": "AAAAAA=="}),
    ("OV", bytes(8), {"InlineBinary": "AAAAAAAAAAA="}),
    ("UN", b"\xfe\xff", {"InlineBinary": "/v8="}),
]


@pytest.mark.parametrize("vr, value, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_encode_per_vr(vr, value, expected):
    entry = encode(vr, value)
    assert entry == {"vr": vr, **expected}
    assert roundtrip({"00091010": entry}) == {"00091010": entry}


@pytest.mark.parametrize("vr", sorted(dj.ALL_VRS - {"SQ"}))
def test_empty_values_have_no_value(vr):
    for empty in (None, b"" if vr in dj.BINARY_VRS else ""):
        assert encode(vr, empty) == {"vr": vr}
    assert roundtrip({"00091010": {"vr": vr}}) == {"00091010": {"vr": vr}}


def test_padding_only_value_is_empty():
    assert encode("LO", "   ") == {"vr": "LO"}
    assert encode("PN", "==") == {"vr": "PN"}


def test_sequences_items_and_bulk_paths():
    inner = Dataset()
    inner.EncapsulatedDocument = b"x" * 10
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ReferencedImageSequence = Sequence([Dataset(), inner])
    ds = Dataset()
    ds.ReferencedSeriesSequence = Sequence([item])
    ds.ReferencedStudySequence = Sequence([])
    ds.PixelData = b"\x00" * 4
    asked = []

    def uri(tag_path, elem):
        asked.append(tag_path)
        return f"bulk:{tag_path}" if elem.tag == 0x7FE00010 else None

    out = dataset_to_json(ds, uri)
    assert out["00081110"] == {"vr": "SQ"}
    assert out["00081115"]["Value"][0]["00081140"]["Value"][0] == {}
    assert out["00081115"]["Value"][0]["00081140"]["Value"][1]["00420011"] == {
        "vr": "OB", "InlineBinary": base64.b64encode(b"x" * 10).decode()}
    assert out["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulk:7FE00010"}
    assert asked == ["00081115/0/00081140/1/00420011", "7FE00010"]


def test_group_length_file_meta_and_padding_are_not_encoded():
    ds = Dataset()
    ds.add_new(0x00080000, "UL", 10)
    ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.1")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00\x00")
    ds.PatientID = "1"
    assert dataset_to_json(ds, no_bulk) == {"00100020": {"vr": "LO", "Value": ["1"]}}


def test_big_endian_binary_values_are_inlined_little_endian():
    ds = Dataset()
    ds.add_new(0x00281201, "OW", b"\x00\x01\x00\x02")
    ds.set_original_encoding(False, False, "iso8859")
    assert dataset_to_json(ds, no_bulk)["00281201"]["InlineBinary"] == base64.b64encode(b"\x01\x00\x02\x00").decode()
    assert swap_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08", 4) == b"\x04\x03\x02\x01\x08\x07\x06\x05"


@pytest.mark.parametrize("text, expected", [
    ("42", 42), (" 42 ", 42), ("+3", 3), ("12.0", 12), ("", None), ("  ", None), ("1.5", "1.5"), ("x", "x"),
    ("1_000", "1_000"),
])
def test_is_to_json(text, expected):
    assert is_to_json(text) == expected and type(is_to_json(text)) is type(expected)


@pytest.mark.parametrize("text, expected", [
    ("1.5", 1.5), ("512", 512.0), ("-1e-3", -0.001), (" 2 ", 2.0), ("", None), ("NaN", "NaN"), ("inf", "inf"),
    ("1e999", "1e999"), ("abc", "abc"), ("1_0", "1_0"),
])
def test_ds_to_json(text, expected):
    assert ds_to_json(text) == expected and type(ds_to_json(text)) is type(expected)


def test_float_and_pn_helpers():
    assert float_to_json(2.5) == 2.5 and float_to_json(math.nan) == "NaN" and float_to_json(-math.inf) == "-Infinity"
    assert pn_to_json("A^B==C") == {"Alphabetic": "A^B", "Phonetic": "C"} and pn_to_json("") is None
    assert pn_from_json({"Alphabetic": "A^B", "Phonetic": "C"}) == "A^B==C"
    assert pn_from_json({"Ideographic": "山田"}) == "=山田" and pn_from_json(None) == ""


# --------------------------------------------------------------------------------------------------
# JSON text


def test_dumps_is_compact_utf8_and_same_json_without_orjson(monkeypatch):
    obj = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller"}]},
           "00200032": {"vr": "DS", "Value": [1e-07, 2.5]}, "00280010": {"vr": "US", "Value": [2**64 - 1]},
           "00091010": {"vr": "UV", "Value": [2**70]}, "7FE00010": {"vr": "OB", "BulkDataURI": "\x01/x"}}
    fast = dumps(obj)
    monkeypatch.setattr(dj, "_orjson", None)
    slow = dumps(obj)
    assert json.loads(fast) == json.loads(slow) == obj
    for text in (fast, slow):
        assert "Müller" in text and ": " not in text and ", " not in text and "\\u0001/x" in text
    with pytest.raises(ValueError):
        dumps({"x": math.nan})


# --------------------------------------------------------------------------------------------------
# decoding errors


@pytest.mark.parametrize("obj, fragment", [
    ([], "JSON object"),
    ({"0010001": {"vr": "PN"}}, "eight hex digits"),
    ({"GGGG0010": {"vr": "PN"}}, "eight hex digits"),
    ({"00100010": "x"}, '"vr"'),
    ({"00100010": {"Value": ["x"]}}, '"vr"'),
    ({"00100010": {"vr": "XX"}}, "unknown VR"),
    ({"00100020": {"vr": "LO", "Value": "x"}}, "must be an array"),
    ({"00100020": {"vr": "LO", "Value": [1]}}, "strings"),
    ({"00100010": {"vr": "PN", "Value": ["A^B"]}}, "PN value"),
    ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": 1}]}}, "strings"),
    ({"00280010": {"vr": "US", "Value": ["1"]}}, "integers"),
    ({"00280010": {"vr": "US", "Value": [True]}}, "integers"),
    ({"00280010": {"vr": "US", "Value": [None]}}, "null"),
    ({"00280010": {"vr": "US", "Value": [70000]}}, "does not fit"),
    ({"00200013": {"vr": "IS", "Value": [[1]]}}, "numbers"),
    ({"00180050": {"vr": "FD", "Value": ["x"]}}, "numbers"),
    ({"00209165": {"vr": "AT", "Value": ["xyz"]}}, "eight hex digits"),
    ({"7FE00010": {"vr": "OB", "InlineBinary": "%%%"}}, "base64"),
    ({"7FE00010": {"vr": "OB", "InlineBinary": 5}}, "base64"),
    ({"7FE00010": {"vr": "OB", "Value": [1]}}, "InlineBinary or BulkDataURI"),
    ({"7FE00010": {"vr": "OB", "BulkDataURI": "http://x/1"}}, "cannot be resolved"),
    ({"7FE00010": {"vr": "OB", "InlineBinary": "AA==", "BulkDataURI": "x"}}, "more than one"),
    ({"00100020": {"vr": "LO", "InlineBinary": "AA=="}}, "binary content"),
    ({"00081115": {"vr": "SQ", "Value": [1]}}, "JSON objects"),
    ({"00081115": {"vr": "SQ", "Value": [{"00100010": {"vr": "PN", "Value": [5]}}]}}, "PN value"),
])
def test_malformed_json_is_invalid(obj, fragment):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ServerError) as info:
            json_to_dataset(obj)
    assert info.value.kind is ErrorKind.INVALID
    assert fragment in info.value.message and info.value.message.startswith("invalid DICOM JSON:")


def test_bulk_loader_resolves_bulk_data_uris():
    calls = []

    def loader(uri, vr):
        calls.append((uri, vr))
        return b"\x01\x02"

    ds = json_to_dataset({"7FE00010": {"vr": "OW", "BulkDataURI": "http://x/bulk/7FE00010"}}, loader)
    assert ds.PixelData == b"\x01\x02" and calls == [("http://x/bulk/7FE00010", "OW")]


def test_decoded_values_have_dicom_form():
    ds = json_to_dataset({
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "A^B", "Ideographic": "甲"}]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
        "00209165": {"vr": "AT", "Value": ["00100010"]},
        "00280030": {"vr": "DS", "Value": [0.5, 0.5]},
        "00081030": {"vr": "LO"},
    })
    assert str(ds.PatientName) == "A^B=甲"
    assert list(ds.ImageType) == ["ORIGINAL", "", "AXIAL"]
    assert ds[0x00209165].value == 0x00100010
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5]
    assert ds.StudyDescription in (None, "")


# --------------------------------------------------------------------------------------------------
# Hypothesis: random data sets -> JSON -> Dataset -> JSON is stable


def _tags_for(vr: str, limit: int = 12) -> list[int]:
    tags = [t for t, entry in DicomDictionary.items()
            if entry[0] == vr and entry[3] == "" and t >> 16 not in (0x0002, 0x0000, 0xFFFE) and t & 0xFFFF]
    return sorted(tags)[:limit]


_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF,
                                            blacklist_characters="\\", blacklist_categories=("Cc",)), max_size=20)
_UPPER = st.text(alphabet=string.ascii_uppercase + string.digits + "_ ", max_size=16)
_COMPONENT = st.text(alphabet=st.characters(min_codepoint=0x41, max_codepoint=0x2FF, blacklist_characters="\\^=",
                                            blacklist_categories=("Cc", "Zs")), max_size=8)
_NAME = st.lists(_COMPONENT, min_size=1, max_size=3).map("^".join)
_PN = st.tuples(_NAME, _NAME, _NAME).map(lambda g: "=".join(g).rstrip("="))


def _multi(values):
    return st.lists(values, min_size=1, max_size=3)


VALUES = {
    "AE": _multi(_UPPER),
    "CS": _multi(_UPPER),
    "SH": _multi(_PRINTABLE),
    "LO": _multi(_PRINTABLE),
    "UC": _multi(_PRINTABLE),
    "LT": st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_categories=("Cc",)),
                  max_size=40),
    "UT": st.text(max_size=40, alphabet=st.characters(min_codepoint=0x0A, max_codepoint=0x7E)),
    "PN": _multi(_PN),
    "DA": _multi(st.dates().map(lambda d: d.strftime("%Y%m%d"))),
    "TM": _multi(st.times().map(lambda t: t.strftime("%H%M%S"))),
    "UI": _multi(st.lists(st.integers(0, 99999), min_size=2, max_size=6).map(lambda p: ".".join(map(str, p)))),
    "IS": _multi(st.integers(-(2**31), 2**31 - 1)),
    "DS": _multi(st.decimals(min_value=-1e6, max_value=1e6, places=4, allow_nan=False).map(lambda d: str(d)[:16])),
    "US": _multi(st.integers(0, 65535)),
    "SS": _multi(st.integers(-32768, 32767)),
    "UL": _multi(st.integers(0, 2**32 - 1)),
    "SL": _multi(st.integers(-(2**31), 2**31 - 1)),
    "UV": _multi(st.integers(0, 2**64 - 1)),
    "SV": _multi(st.integers(-(2**63), 2**63 - 1)),
    "FL": _multi(st.floats(width=32)),
    "FD": _multi(st.floats()),
    "AT": _multi(st.integers(0, 2**32 - 1)),
    "OB": st.binary(max_size=40),
    "OW": st.binary(max_size=40).map(lambda b: b[: len(b) // 2 * 2]),
    "UN": st.binary(max_size=20),
}
TAGS = {vr: _tags_for(vr) for vr in [*VALUES, "SQ"]}
TAGS = {vr: tags for vr, tags in TAGS.items() if tags}


@st.composite
def datasets(draw, depth: int = 0) -> Dataset:
    ds = Dataset()
    vrs = draw(st.lists(st.sampled_from(sorted(set(VALUES) & set(TAGS))), max_size=8))
    for vr in vrs:
        tag = draw(st.sampled_from(TAGS[vr]))
        ds.add(DataElement(tag, vr, draw(VALUES[vr])))
    if depth < 2 and draw(st.booleans()):
        tag = draw(st.sampled_from(TAGS["SQ"]))
        ds.add(DataElement(tag, "SQ", Sequence(draw(st.lists(datasets(depth + 1), max_size=3)))))
    return ds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_round_trip(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.draw(datasets())
        first = dataset_to_json(ds, no_bulk)
    assert roundtrip(first) == first
    assert json.loads(dumps(first)) == first
