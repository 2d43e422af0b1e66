"""DICOM JSON Model encoder and decoder (PS3.18 F.2).

Encoding rules, shared by the pydicom-based encoder below and by the raw ingest encoder of
``server.dicom.parse`` (both must give identical output for identical data):

* keys are eight upper-case hex digits (F.2.1.1), in tag order as stored; "vr" always present (F.2.2);
* an empty value (zero length, or only padding) has no "Value"; an empty value inside a
  multi-valued attribute is ``null`` (F.2.5); a sequence without items has no "Value";
* strings are split at the backslash except for ST, LT, UT and UR (single valued); short strings are
  stripped of leading and trailing spaces and NULs, text (ST, LT, UT, UC, UR, PN) of trailing ones only;
* PN values are objects with "Alphabetic", "Ideographic" and "Phonetic" keys, empty groups omitted;
  a PN value whose groups are all empty is ``null`` (F.2.2);
* IS and DS are JSON Numbers (F.2.3): IS as an integer, DS as a float (``"512"`` -> ``512.0``). A value
  that is not a finite decimal number (e.g. "1.5a", "NaN", "1e999") is kept as the JSON String of its
  stripped text, which CP-1861 allows (DS/IS "Number or String"); the ingest reports it as
  :attr:`~server.dicom.parse.IngestWarning.VALUE_NOT_CONFORMING`. :func:`json_to_dataset` refuses such
  strings (pydicom cannot hold them as DS/IS);
* FL and FD are JSON Numbers (FL as the exact double of its float32, e.g. 0.30000001192092896); values
  JSON cannot carry (NaN, +/-infinity) are the JSON Strings "NaN", "Infinity" and "-Infinity";
* AT values are eight hex digit strings (F.2.3);
* OB, OD, OF, OL, OV, OW and UN have "InlineBinary" (base64, little endian) or "BulkDataURI" (F.2.6/7);
* group length elements (gggg,0000), file meta information (0002,xxxx) and Data Set Trailing Padding
  (FFFC,FFFC) are not part of the JSON data set.

:func:`json_to_dataset` reverses this; malformed JSON raises ``ServerError(INVALID)``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from server.errors import ErrorKind, ServerError

try:  # optional accelerator for dumps(); the output is the same JSON either way
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None  # type: ignore[assignment]

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
SINGLE_TEXT_VRS = frozenset({"ST", "LT", "UT", "UR"})
TEXT_RSTRIP_VRS = frozenset({"ST", "LT", "UT", "UC", "UR", "PN"})
STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
INT_VRS = frozenset({"SL", "SS", "SV", "UL", "US", "UV"})
FLOAT_VRS = frozenset({"FL", "FD"})
ALL_VRS = STRING_VRS | BINARY_VRS | INT_VRS | FLOAT_VRS | {"PN", "IS", "DS", "AT", "SQ"}
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
TRAILING_PADDING = 0xFFFCFFFC
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# Dictionary VRs that depend on context, resolved as an implicit VR reader does (PS3.5 A.1).
AMBIGUOUS_VRS = {"US or SS": "US", "OB or OW": "OW", "US or OW": "OW", "US or SS or OW": "OW"}

# How BINARY VRs are byte-swapped to little endian for InlineBinary (PS3.5 7.3).
SWAP_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

_INT_RANGES = {
    "US": (0, 2**16 - 1), "SS": (-(2**15), 2**15 - 1), "UL": (0, 2**32 - 1), "SL": (-(2**31), 2**31 - 1),
    "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1),
}

BulkUri = Callable[[str, DataElement], "str | None"]
BulkLoader = Callable[[str, str], bytes]

_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_FROM_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def dumps(obj: Any) -> str:
    """Compact JSON text of a DICOM JSON object (PS3.18 F.2), non-ASCII characters kept as UTF-8.

    Uses orjson when it is installed (about ten times faster; numbers may be spelt differently, e.g.
    ``1e-7`` for ``1e-07``, same JSON values), else the standard library. The encoders here never pass
    NaN or infinities (see :func:`float_to_json`); the standard library refuses them, orjson writes null.
    """
    if _orjson is not None:
        try:
            return _orjson.dumps(obj).decode()
        except (TypeError, _orjson.JSONEncodeError):
            pass  # e.g. an integer beyond 64 bits: the standard library handles it
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes of ``obj`` for a response body (orjson when available)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(obj)
        except (TypeError, _orjson.JSONEncodeError):
            pass
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def loads(text: str | bytes) -> Any:
    """Parse JSON text (orjson when available)."""
    if _orjson is not None:
        return _orjson.loads(text)
    return json.loads(text)


def tag_key(tag: int) -> str:
    """The DICOM JSON key of a tag: eight upper-case hex digits (PS3.18 F.2.1.1)."""
    return f"{tag:08X}"


def is_excluded(tag: int) -> bool:
    """Whether an element stays out of a JSON data set: group lengths, file meta, trailing padding."""
    return tag & 0xFFFF == 0 or tag >> 16 == 0x0002 or tag == TRAILING_PADDING


def is_to_json(text: str) -> int | str | None:
    """IS text -> JSON Number, None when empty, the stripped text when not an integer (PS3.18 F.2.3)."""
    text = text.strip(" \x00")
    if not text:
        return None
    if "_" not in text:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text
        if number.is_integer():
            return int(number)
    return text


def ds_to_json(text: str) -> int | float | str | None:
    """DS text -> JSON Number, None when empty, the stripped text when not a finite number (F.2.3)."""
    text = text.strip(" \x00")
    if not text:
        return None
    if "_" in text:
        return text
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def float_to_json(value: float) -> float | str:
    """FD value -> JSON Number, or "NaN"/"Infinity"/"-Infinity" which JSON Numbers cannot carry."""
    if math.isfinite(value):
        return value
    return _NON_FINITE[repr(value)]


def pn_to_json(value: str) -> dict[str, str] | None:
    """One PN value "A=I=P" -> {"Alphabetic", "Ideographic", "Phonetic"}, empty groups left out (F.2.2)."""
    groups = value.split("=")
    out = {key: group for key, group in zip(PN_GROUPS, groups) if group}
    return out or None


def pn_from_json(obj: Mapping[str, Any] | None) -> str:
    """A PN JSON object -> the DICOM string "A=I=P" with trailing empty groups dropped (F.2.2)."""
    if obj is None:
        return ""
    if not isinstance(obj, Mapping) or set(obj) - set(PN_GROUPS):
        raise _bad("a PN value must be an object with Alphabetic, Ideographic or Phonetic keys")
    groups = [obj.get(key) or "" for key in PN_GROUPS]
    if not all(isinstance(g, str) for g in groups):
        raise _bad("PN name groups must be strings")
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def inline_binary(raw: bytes, vr: str, little_endian: bool = True) -> str:
    """Base64 of a binary value in little endian byte order (PS3.18 F.2.7)."""
    size = SWAP_SIZE.get(vr)
    if not little_endian and size and len(raw) % size == 0:
        raw = swap_bytes(raw, size)
    return base64.b64encode(raw).decode("ascii")


def swap_bytes(raw: bytes, size: int) -> bytes:
    """Reverse the byte order of every ``size``-byte word of a value (PS3.5 7.3)."""
    out = bytearray(len(raw))
    for i in range(size):
        out[i::size] = raw[size - 1 - i :: size]
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# pydicom Dataset -> DICOM JSON


def dataset_to_json(
    ds: Dataset, bulk_uri: BulkUri, _prefix: str = "", _little: bool | None = None
) -> dict[str, Any]:
    """A pydicom data set as a DICOM JSON object (PS3.18 F.2), bulk data resolved by ``bulk_uri``.

    ``bulk_uri(tag_path, element)`` is asked for every binary element (OB, OD, OF, OL, OV, OW, UN) and
    every pixel data element at any depth; ``tag_path`` is the hex tags joined by "/" with the item
    index of each enclosing sequence (e.g. "00880200/0/7FE00010"). A string becomes the element's
    "BulkDataURI" (F.2.6), None inlines the value as "InlineBinary" (F.2.7), in little endian byte order
    even when the data set was read from a big endian file.
    """
    if _little is None:
        _little = _is_little_endian(ds)
    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        if is_excluded(tag):
            continue
        key = tag_key(tag)
        out[key] = element_to_json(elem, bulk_uri, _prefix + key, _little)
    return out


def _is_little_endian(ds: Dataset) -> bool:
    """The byte order the data set's binary values were read in (little endian unless read as big)."""
    encoding = getattr(ds, "original_encoding", (None, None))
    return encoding[1] is not False


def element_to_json(elem: DataElement, bulk_uri: BulkUri, path: str, little: bool = True) -> dict[str, Any]:
    """One pydicom data element as a DICOM JSON attribute object (PS3.18 F.2.2)."""
    vr = str(elem.VR)
    vr = AMBIGUOUS_VRS.get(vr, vr)
    if vr in BINARY_VRS or int(elem.tag) in PIXEL_TAGS:
        return _binary_to_json(elem, vr, bulk_uri, path, little)
    if vr == "SQ":
        items = [dataset_to_json(item, bulk_uri, f"{path}/{i}/", little) for i, item in enumerate(elem.value)]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    values = _values(elem)
    if not values:
        return {"vr": vr}
    encoded = [_value_to_json(vr, v) for v in values]
    if len(encoded) == 1 and encoded[0] is None:
        return {"vr": vr}
    return {"vr": vr, "Value": encoded}


def _binary_to_json(elem: DataElement, vr: str, bulk_uri: BulkUri, path: str, little: bool) -> dict[str, Any]:
    """A binary element as BulkDataURI or InlineBinary (PS3.18 F.2.6, F.2.7); encapsulated data is OB."""
    if elem.is_undefined_length or vr not in BINARY_VRS:
        vr = "OB" if elem.is_undefined_length else "OW"
    raw = elem.value
    if raw is None or len(raw) == 0:
        return {"vr": vr}
    if not isinstance(raw, bytes | bytearray):
        raise ServerError(ErrorKind.INVALID, f"element {tag_key(int(elem.tag))} has VR {vr} but no bytes value")
    uri = bulk_uri(path, elem)
    if uri is not None:
        return {"vr": vr, "BulkDataURI": uri}
    return {"vr": vr, "InlineBinary": inline_binary(bytes(raw), vr, little)}


def _values(elem: DataElement) -> list[Any]:
    """The element's values as a list (VM 0 -> [], VM 1 -> [value])."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, str | bytes | PersonName) or not hasattr(value, "__iter__"):
        return [] if value == "" else [value]
    return list(value)


def _value_to_json(vr: str, value: Any) -> Any:
    """One value of a non-binary, non-sequence element as its JSON value (PS3.18 F.2.3)."""
    if value is None:
        return None
    if vr == "PN":
        text = str(value).rstrip(" \x00")
        return pn_to_json(text) if text else None
    if vr == "IS":
        return int(value) if isinstance(value, int) else is_to_json(str(value))
    if vr == "DS":
        return ds_to_json(str(value))
    if vr in FLOAT_VRS:
        return float_to_json(float(value))
    if vr in INT_VRS:
        return int(value)
    if vr == "AT":
        return tag_key(int(value))
    text = str(value)
    text = text.rstrip(" \x00") if vr in TEXT_RSTRIP_VRS else text.strip(" \x00")
    return text or None


# --------------------------------------------------------------------------------------------------
# DICOM JSON -> pydicom Dataset


def json_to_dataset(obj: Any, bulk_loader: BulkLoader | None = None) -> Dataset:
    """A DICOM JSON object (PS3.18 F.2) as a pydicom data set.

    ``bulk_loader(uri, vr)`` returns the bytes of a "BulkDataURI" (F.2.6); without it a BulkDataURI is
    refused as INVALID. Malformed JSON raises ``ServerError(INVALID)`` naming the attribute.
    """
    if not isinstance(obj, Mapping):
        raise _bad("a DICOM JSON data set must be a JSON object")
    ds = Dataset()
    for key, attr in obj.items():
        tag = _tag_from_key(key)
        try:
            ds.add(_element_from_json(tag, attr, bulk_loader))
        except ServerError:
            raise
        except (ValueError, TypeError, OverflowError, struct.error) as exc:
            raise _bad(f"attribute {key} has a value that does not fit its VR") from exc
    return ds


def _tag_from_key(key: Any) -> int:
    """A DICOM JSON key -> tag; eight hex digits (PS3.18 F.2.1.1)."""
    if not isinstance(key, str) or len(key) != 8:
        raise _bad(f"attribute key {key!r} is not eight hex digits")
    try:
        return int(key, 16)
    except ValueError as exc:
        raise _bad(f"attribute key {key!r} is not eight hex digits") from exc


def _element_from_json(tag: int, attr: Any, bulk_loader: BulkLoader | None) -> DataElement:
    """One DICOM JSON attribute object -> pydicom DataElement (PS3.18 F.2.2)."""
    key = tag_key(tag)
    if not isinstance(attr, Mapping) or not isinstance(attr.get("vr"), str):
        raise _bad(f"attribute {key} must be an object with a \"vr\"")
    vr = attr["vr"]
    if vr not in ALL_VRS:
        raise _bad(f"attribute {key} has unknown VR {vr!r}")
    present = [k for k in ("Value", "InlineBinary", "BulkDataURI") if k in attr]
    if len(present) > 1:
        raise _bad(f"attribute {key} has more than one of Value, InlineBinary, BulkDataURI")
    if vr in BINARY_VRS:
        return DataElement(tag, vr, _binary_from_json(key, vr, attr, bulk_loader))
    if "InlineBinary" in attr or "BulkDataURI" in attr:
        raise _bad(f"attribute {key} with VR {vr} cannot have binary content")
    values = attr.get("Value")
    if values is None:
        return DataElement(tag, vr, None if vr != "SQ" else Sequence())
    if not isinstance(values, list):
        raise _bad(f"attribute {key}: \"Value\" must be an array")
    if vr == "SQ":
        return DataElement(tag, vr, Sequence([_item(key, item, bulk_loader) for item in values]))
    decoded = [_value_from_json(key, vr, v) for v in values]
    if vr in STRING_VRS or vr == "PN":
        decoded = ["" if v is None else v for v in decoded]
        if vr in SINGLE_TEXT_VRS:
            return DataElement(tag, vr, "\\".join(decoded))
    if any(v is None for v in decoded):
        raise _bad(f"attribute {key}: null values are not supported for VR {vr}")
    return DataElement(tag, vr, decoded[0] if len(decoded) == 1 else decoded)


def _item(key: str, item: Any, bulk_loader: BulkLoader | None) -> Dataset:
    """One sequence item (a JSON object, F.2.2) -> Dataset."""
    if not isinstance(item, Mapping):
        raise _bad(f"attribute {key}: sequence items must be JSON objects")
    return json_to_dataset(item, bulk_loader)


def _binary_from_json(key: str, vr: str, attr: Mapping[str, Any], bulk_loader: BulkLoader | None) -> bytes | None:
    """InlineBinary / BulkDataURI -> bytes (PS3.18 F.2.6, F.2.7)."""
    if "Value" in attr:
        raise _bad(f"attribute {key} with VR {vr} must use InlineBinary or BulkDataURI")
    if "InlineBinary" in attr:
        text = attr["InlineBinary"]
        if not isinstance(text, str):
            raise _bad(f"attribute {key}: InlineBinary must be a base64 string")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"attribute {key}: InlineBinary is not valid base64") from exc
    if "BulkDataURI" in attr:
        uri = attr["BulkDataURI"]
        if not isinstance(uri, str):
            raise _bad(f"attribute {key}: BulkDataURI must be a string")
        if bulk_loader is None:
            raise _bad(f"attribute {key}: BulkDataURI {uri!r} cannot be resolved here")
        return bulk_loader(uri, vr)
    return None


def _value_from_json(key: str, vr: str, value: Any) -> Any:
    """One JSON value -> the pydicom value for its VR (PS3.18 F.2.3)."""
    if value is None:
        return None
    if vr == "PN":
        return pn_from_json(value)
    if vr in STRING_VRS:
        if not isinstance(value, str):
            raise _bad(f"attribute {key}: VR {vr} values must be strings")
        return value
    if vr == "AT":
        if not isinstance(value, str) or len(value) != 8:
            raise _bad(f"attribute {key}: AT values must be eight hex digits")
        try:
            return int(value, 16)
        except ValueError as exc:
            raise _bad(f"attribute {key}: AT values must be eight hex digits") from exc
    if vr in ("IS", "DS"):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _bad(f"attribute {key}: VR {vr} values must be numbers")
        return value
    if vr in FLOAT_VRS:
        if isinstance(value, str) and value in _FROM_NON_FINITE:
            return _FROM_NON_FINITE[value]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(f"attribute {key}: VR {vr} values must be numbers")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"attribute {key}: VR {vr} values must be integers")
    low, high = _INT_RANGES[vr]
    if not low <= value <= high:
        raise _bad(f"attribute {key}: {value} does not fit VR {vr}")
    return value


def _bad(message: str) -> ServerError:
    return ServerError(ErrorKind.INVALID, f"invalid DICOM JSON: {message}")
