"""Structure validation of FHIR R4 resources: the one module importing ``fhir.resources`` (its R4B models).

R4B element names and cardinalities are those of R4 (4.0.1) for every resource type we serve.
"""

from __future__ import annotations

import functools
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from server.errors import ErrorKind, ServerError

#: The resource types served under /fhir.
SUPPORTED_TYPES: tuple[str, ...] = (
    "Patient", "Organization", "HealthcareService", "Endpoint", "ServiceRequest", "Task",
    "DiagnosticReport", "DocumentReference", "QuestionnaireResponse", "Subscription", "AuditEvent",
    "ImagingStudy",
)
#: Types only the server writes: AuditEvent (the server's record), ImagingStudy (a projection of the archive).
READ_ONLY_TYPES: tuple[str, ...] = ("AuditEvent", "ImagingStudy")


def expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    """The FHIRPath-like expression of a pydantic error location: ``Patient.name[0].family``."""
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "__root__":
            out += f".{part}"
    return out


def parse_resource(data: Any) -> dict:
    """The resource ``data`` validated against its R4 structure, as a JSON-ready dict (FHIR R4 2.6.2 JSON)."""
    if not isinstance(data, dict):
        raise ServerError(ErrorKind.INVALID, "the body is not a JSON object", parameter="Resource")
    rtype = data.get("resourceType")
    if not isinstance(rtype, str) or rtype not in SUPPORTED_TYPES:
        raise ServerError(ErrorKind.INVALID, f"unsupported or missing resourceType {rtype!r}",
                          parameter="Resource.resourceType")
    model = get_fhir_model_class(rtype)
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        what = {"missing": "required element missing", "extra_forbidden": "unknown element"}.get(
            first["type"], "invalid value")
        raise ServerError(ErrorKind.INVALID, f"{what} ({exc.error_count()} problem(s))",
                          parameter=expression(rtype, first["loc"])) from exc
    except (ValueError, TypeError) as exc:
        raise ServerError(ErrorKind.INVALID, "invalid resource", parameter=rtype) from exc
    return parsed.model_dump(mode="json", exclude_none=True, by_alias=True)


#: Elements every subset keeps (FHIR R4 3.1.1.5.8: id, meta and the mandatory elements).
ALWAYS_KEPT = frozenset({"resourceType", "id", "meta", "implicitRules"})


@functools.lru_cache(maxsize=64)
def summary_elements(resource_type: str) -> frozenset[str]:
    """The JSON names of the elements marked isSummary in the R4 definition of the type (_summary=true)."""
    model = get_fhir_model_class(resource_type)
    return frozenset(f.alias or name for name, f in model.model_fields.items()
                     if (f.json_schema_extra or {}).get("summary_element_property")) | ALWAYS_KEPT


@functools.lru_cache(maxsize=64)
def required_elements(resource_type: str) -> frozenset[str]:
    """The JSON names of the mandatory (min 1) top-level elements of the type."""
    model = get_fhir_model_class(resource_type)
    return frozenset(f.alias or name for name, f in model.model_fields.items()
                     if f.is_required() or (f.json_schema_extra or {}).get("element_required"))


def to_xml(resource: dict) -> bytes:
    """The FHIR XML form of a resource (FHIR R4 2.6.1 XML); ``resource`` is valid JSON of a served type."""
    model = get_fhir_model_class(resource["resourceType"])
    return model.model_validate(resource).model_dump_xml()


def from_xml(data: bytes) -> dict:
    """The JSON form of a FHIR XML resource (FHIR R4 2.6.1); INVALID for malformed XML or an unknown type."""
    from lxml import etree  # fhir.resources' XML support needs lxml

    def parser():  # no entity expansion, no network, no huge trees (XXE and entity-expansion attacks)
        return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False)

    try:
        root = etree.fromstring(data, parser=parser())
    except etree.XMLSyntaxError as exc:
        raise ServerError(ErrorKind.INVALID, f"malformed XML: {exc}", parameter="Resource") from exc
    rtype = etree.QName(root).localname
    if etree.QName(root).namespace != "http://hl7.org/fhir" or rtype not in (*SUPPORTED_TYPES, "Bundle",
                                                                              "Parameters"):
        raise ServerError(ErrorKind.INVALID, f"unsupported XML root {root.tag!r}", parameter="Resource")
    try:
        parsed = get_fhir_model_class(rtype).model_validate_xml(data, xmlparser=parser())
    except (ValidationError, ValueError, TypeError, KeyError) as exc:
        raise ServerError(ErrorKind.INVALID, "invalid XML resource", parameter=rtype) from exc
    return parsed.model_dump(mode="json", exclude_none=True, by_alias=True)
