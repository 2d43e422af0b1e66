"""Profile validation driven by the conformance resources in ``profiles/`` (pure core, no I/O besides loading them).

FHIR R4 (4.0.1) "Validating Resources" (validation.html) and StructureDefinition (structuredefinition.html): for a
resource that is already structurally valid JSON, check the constrained elements of its profile(s):

- cardinality (``min``/``max``) of each constrained element, per parent instance (elementdefinition.html#min-max);
- ``fixed[x]`` (exact) and ``pattern[x]`` (subset) values (elementdefinition.html#fixed, #pattern);
- ``required`` bindings: to the ValueSets in ``profiles/`` and to the FHIR R4 value sets in ``HL7_VALUE_SETS``
  (terminologies.html#required);
- Reference target types (``type.targetProfile``, references.html);
- the type of ``value[x]`` of extensions and the invariants (``constraint.expression``, FHIRPath via fhirpathpy);
- extension slices, discriminated by ``url`` (profiling.html#slicing), and every extension whose url is a known
  extension StructureDefinition, wherever it occurs in the resource;
- the R4 base required bindings of the resources we serve (``BASE_BINDINGS``), with or without a profile.

Not checked: structure/datatypes of the base resource (``fhir.resources`` owns that), bindings weaker than required,
``mustSupport``, other slicing than extension url, invariants of the base resource (dom-*, ele-1 …).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fhirpathpy import compile as compile_fhirpath
from fhirpathpy.models import models as _FHIRPATH_MODELS

from server.errors import ErrorKind, ServerError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
BASE = "https://telerad-bridge.de/fhir"
HL7_SD = "http://hl7.org/fhir/StructureDefinition/"

SERVICE_REQUEST_PROFILE = f"{BASE}/StructureDefinition/teleconsult-servicerequest"
TASK_PROFILE = f"{BASE}/StructureDefinition/teleconsult-task"
DICOM_EMAIL_ENDPOINT_PROFILE = f"{BASE}/StructureDefinition/dicom-email-endpoint"
CONNECTION_TYPE_SYSTEM = f"{BASE}/CodeSystem/endpoint-connection-type"
REQUIRED_STRENGTH = "required"  # the only binding strength enforced (terminologies.html#strength)


class Code:
    """OperationOutcome issue-type codes we emit (R4 valueset-issue-type.html)."""

    REQUIRED = "required"
    STRUCTURE = "structure"
    VALUE = "value"
    CODE_INVALID = "code-invalid"
    INVARIANT = "invariant"


class Severity:
    """OperationOutcome issue severities (R4 valueset-issue-severity.html)."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue: severity, code, FHIRPath expression of the element, human message (R4 6.1.0)."""

    severity: str
    code: str
    expression: str
    message: str


# --- Terminology tables ---------------------------------------------------------------------------------------------

def _system(system: str, *codes: str) -> frozenset[tuple[str, str]]:
    return frozenset((system, c) for c in codes)


_REQUEST_INTENT = _system("http://hl7.org/fhir/request-intent", "proposal", "plan", "directive", "order",
                          "original-order", "reflex-order", "filler-order", "instance-order", "option")

#: FHIR R4 code systems we can expand (complete content, 4.0.1).
HL7_CODE_SYSTEMS: Mapping[str, frozenset[str]] = MappingProxyType({
    "http://hl7.org/fhir/task-status": frozenset({
        "draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress", "on-hold",
        "failed", "completed", "entered-in-error"}),
    "http://hl7.org/fhir/request-status": frozenset({
        "draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}),
    "http://hl7.org/fhir/request-intent": frozenset(c for _, c in _REQUEST_INTENT),
    "http://hl7.org/fhir/request-priority": frozenset({"routine", "urgent", "asap", "stat"}),
    "http://hl7.org/fhir/endpoint-status": frozenset({
        "active", "suspended", "error", "off", "entered-in-error", "test"}),
    "http://hl7.org/fhir/administrative-gender": frozenset({"male", "female", "other", "unknown"}),
    "http://hl7.org/fhir/diagnostic-report-status": frozenset({
        "registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
        "entered-in-error", "unknown"}),
    "http://hl7.org/fhir/document-reference-status": frozenset({"current", "superseded", "entered-in-error"}),
    "http://hl7.org/fhir/composition-status": frozenset({"preliminary", "final", "amended", "entered-in-error"}),
    "http://hl7.org/fhir/questionnaire-answers-status": frozenset({
        "in-progress", "completed", "amended", "entered-in-error", "stopped"}),
    "http://hl7.org/fhir/subscription-status": frozenset({"requested", "active", "error", "off"}),
    "http://hl7.org/fhir/subscription-channel-type": frozenset({"rest-hook", "websocket", "email", "sms",
                                                                "message"}),
    "http://hl7.org/fhir/days-of-week": frozenset({"mon", "tue", "wed", "thu", "fri", "sat", "sun"}),
    "http://hl7.org/fhir/CodeSystem/task-code": frozenset({
        "approve", "fulfill", "abort", "replace", "change", "suspend", "resume"}),
    "http://terminology.hl7.org/CodeSystem/endpoint-connection-type": frozenset({
        "ihe-xcpd", "ihe-xca", "ihe-xdr", "ihe-xds", "ihe-iid", "dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs",
        "dicom-wado-uri", "hl7-fhir-rest", "hl7-fhir-msg", "hl7v2-mllp", "secure-email", "direct-project"}),
})

#: FHIR R4 required value sets of the resources we serve (valueset-<name>.html), as (system, code) pairs.
HL7_VALUE_SETS: Mapping[str, frozenset[tuple[str, str]]] = MappingProxyType({
    "http://hl7.org/fhir/ValueSet/task-status":
        _system("http://hl7.org/fhir/task-status", *HL7_CODE_SYSTEMS["http://hl7.org/fhir/task-status"]),
    "http://hl7.org/fhir/ValueSet/task-intent":
        _system("http://hl7.org/fhir/task-intent", "unknown")
        | frozenset(p for p in _REQUEST_INTENT if p[1] != "directive"),
    "http://hl7.org/fhir/ValueSet/request-status":
        _system("http://hl7.org/fhir/request-status", *HL7_CODE_SYSTEMS["http://hl7.org/fhir/request-status"]),
    "http://hl7.org/fhir/ValueSet/request-intent": _REQUEST_INTENT,
    "http://hl7.org/fhir/ValueSet/request-priority":
        _system("http://hl7.org/fhir/request-priority", *HL7_CODE_SYSTEMS["http://hl7.org/fhir/request-priority"]),
    "http://hl7.org/fhir/ValueSet/endpoint-status":
        _system("http://hl7.org/fhir/endpoint-status", *HL7_CODE_SYSTEMS["http://hl7.org/fhir/endpoint-status"]),
})



def _whole(name: str, system: str | None = None) -> tuple[str, frozenset[tuple[str, str]]]:
    """An R4 value set that is the whole of its code system (``http://hl7.org/fhir/<name>``)."""
    system = system or f"http://hl7.org/fhir/{name}"
    return f"http://hl7.org/fhir/ValueSet/{name}", _system(system, *HL7_CODE_SYSTEMS[system])


HL7_VALUE_SETS = MappingProxyType({**HL7_VALUE_SETS, **dict(_whole(n) for n in (
    "administrative-gender", "diagnostic-report-status", "document-reference-status", "composition-status",
    "questionnaire-answers-status", "subscription-status", "subscription-channel-type", "days-of-week"))})

#: Required bindings of the R4 base resources (element path -> value set), checked on every resource of the type.
BASE_BINDINGS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "ServiceRequest": {"ServiceRequest.status": "http://hl7.org/fhir/ValueSet/request-status",
                       "ServiceRequest.intent": "http://hl7.org/fhir/ValueSet/request-intent",
                       "ServiceRequest.priority": "http://hl7.org/fhir/ValueSet/request-priority"},
    "Task": {"Task.status": "http://hl7.org/fhir/ValueSet/task-status",
             "Task.intent": "http://hl7.org/fhir/ValueSet/task-intent",
             "Task.priority": "http://hl7.org/fhir/ValueSet/request-priority"},
    "Endpoint": {"Endpoint.status": "http://hl7.org/fhir/ValueSet/endpoint-status"},
    "Patient": {"Patient.gender": "http://hl7.org/fhir/ValueSet/administrative-gender",
                "Patient.contact.gender": "http://hl7.org/fhir/ValueSet/administrative-gender"},
    "DiagnosticReport": {"DiagnosticReport.status": "http://hl7.org/fhir/ValueSet/diagnostic-report-status"},
    "DocumentReference": {"DocumentReference.status": "http://hl7.org/fhir/ValueSet/document-reference-status",
                          "DocumentReference.docStatus": "http://hl7.org/fhir/ValueSet/composition-status"},
    "QuestionnaireResponse": {
        "QuestionnaireResponse.status": "http://hl7.org/fhir/ValueSet/questionnaire-answers-status"},
    "Subscription": {"Subscription.status": "http://hl7.org/fhir/ValueSet/subscription-status",
                     "Subscription.channel.type": "http://hl7.org/fhir/ValueSet/subscription-channel-type"},
    "HealthcareService": {
        "HealthcareService.availableTime.daysOfWeek": "http://hl7.org/fhir/ValueSet/days-of-week"},
})

#: Profile applied when a resource claims none we know, by resource type.
DEFAULT_PROFILE_BY_TYPE: Mapping[str, str] = MappingProxyType({
    "ServiceRequest": SERVICE_REQUEST_PROFILE,
    "Task": TASK_PROFILE,
})

#: Profile applied to an Endpoint that claims none we know, by its connectionType (system, code).
DEFAULT_ENDPOINT_PROFILE_BY_CONNECTION: Mapping[tuple[str, str], str] = MappingProxyType({
    (CONNECTION_TYPE_SYSTEM, "dicom-email"): DICOM_EMAIL_ENDPOINT_PROFILE,
})


# --- Registry -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expansion:
    """The (system, code) pairs of a value set; ``open_systems`` are included whole but cannot be enumerated."""

    codes: frozenset[tuple[str, str]]
    open_systems: frozenset[str] = frozenset()

    def has_coding(self, system: str | None, code: str | None) -> bool:
        """Whether a Coding is in the value set (terminologies.html#required)."""
        return (system, code) in self.codes or (system in self.open_systems and code is not None)

    def has_code(self, code: str) -> bool:
        """Whether a bare ``code`` is in the value set (the system is implied by the binding)."""
        return any(c == code for _, c in self.codes) or bool(self.open_systems)


@dataclass(frozen=True)
class Registry:
    """The conformance resources loaded from ``profiles/``, by canonical URL."""

    structure_definitions: Mapping[str, dict]
    value_sets: Mapping[str, Expansion]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ServerError(ErrorKind.INTERNAL, f"FHIR profile file unreadable: {path.name}") from exc
    if not isinstance(data, dict) or "resourceType" not in data or "url" not in data:
        raise ServerError(ErrorKind.INTERNAL, f"FHIR profile file lacks resourceType/url: {path.name}")
    return data


def _codes_of(concepts: list[dict]) -> Iterator[str]:
    for concept in concepts:
        yield concept["code"]
        yield from _codes_of(concept.get("concept", []))


def _expand(vs: dict, code_systems: Mapping[str, frozenset[str]]) -> Expansion:
    """Expand ``compose.include`` (system with or without concepts; no filters, no excludes) (valueset.html#compose)."""
    codes: set[tuple[str, str]] = set()
    open_systems: set[str] = set()
    for include in vs.get("compose", {}).get("include", []):
        system = include["system"]
        if include.get("concept"):
            codes |= {(system, c["code"]) for c in include["concept"]}
        elif system in code_systems:
            codes |= {(system, c) for c in code_systems[system]}
        else:
            open_systems.add(system)
    return Expansion(frozenset(codes), frozenset(open_systems))


def _required_value_sets(sd: dict) -> Iterator[str]:
    for element in sd.get("differential", {}).get("element", []):
        binding = element.get("binding", {})
        if binding.get("strength") == REQUIRED_STRENGTH and "valueSet" in binding:
            yield binding["valueSet"].split("|")[0]


@functools.lru_cache(maxsize=4)
def load_registry(folder: Path = PROFILES_DIR) -> Registry:
    """Load every JSON file of ``folder``; fail clearly if it is missing or a required binding cannot be resolved."""
    if not folder.is_dir():
        raise ServerError(ErrorKind.INTERNAL, f"FHIR profiles folder missing: {folder}")
    resources = [_read_json(p) for p in sorted(folder.glob("*.json"))]
    code_systems = dict(HL7_CODE_SYSTEMS)
    code_systems.update({r["url"]: frozenset(_codes_of(r.get("concept", [])))
                         for r in resources if r["resourceType"] == "CodeSystem" and r.get("content") == "complete"})
    value_sets = {url: Expansion(codes) for url, codes in HL7_VALUE_SETS.items()}
    value_sets.update({r["url"]: _expand(r, code_systems) for r in resources if r["resourceType"] == "ValueSet"})
    sds = {r["url"]: r for r in resources if r["resourceType"] == "StructureDefinition"}
    for sd in sds.values():
        missing = [vs for vs in _required_value_sets(sd) if vs not in value_sets]
        if missing:
            raise ServerError(ErrorKind.INTERNAL, f"{sd['url']} binds to unknown value sets {missing}")
    return Registry(MappingProxyType(sds), MappingProxyType(value_sets))


def known_profiles(folder: Path = PROFILES_DIR) -> dict[str, dict]:
    """Our StructureDefinitions by canonical URL (for the CapabilityStatement and ``$validate``)."""
    return dict(load_registry(folder).structure_definitions)


# --- Navigation -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """A value in the resource with the FHIRPath expression that selects it."""

    expression: str
    value: Any
    key: str = ""


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _choice_key(obj: dict, name: str) -> str | None:
    """The JSON key of a choice element ``name[x]`` present in ``obj`` (json.html#choice)."""
    stem = name[:-3]
    return next((k for k in obj if k.startswith(stem) and k[len(stem):][:1].isupper()), None)


def _children(parent: Node, segment: str, slice_url: str | None) -> list[Node]:
    """The values of one path segment under ``parent``, indexed like FHIRPath (``a.b[1]``)."""
    if not isinstance(parent.value, dict):
        return []
    name = segment.split(":")[0]
    key = _choice_key(parent.value, name) if name.endswith("[x]") else name
    if key is None or key not in parent.value:
        return []
    raw = parent.value[key]
    items = list(enumerate(raw)) if isinstance(raw, list) else [(None, raw)]
    nodes = [Node(f"{parent.expression}.{key}" + (f"[{i}]" if i is not None else ""), v, key) for i, v in items]
    if slice_url is not None:
        nodes = [n for n in nodes if isinstance(n.value, dict) and n.value.get("url") == slice_url]
    return nodes


@dataclass(frozen=True)
class Profile:
    """A StructureDefinition's differential, indexed by element id."""

    sd: dict
    elements: Mapping[str, dict]

    @classmethod
    def of(cls, sd: dict) -> "Profile":
        """Index the differential of ``sd`` by element id."""
        elements = sd.get("differential", {}).get("element", [])
        return cls(sd, MappingProxyType({e.get("id", e["path"]): e for e in elements}))

    def slice_url(self, element_id: str) -> str | None:
        """The url discriminating an extension slice: its type profile or its fixed ``url`` (profiling.html#slicing)."""
        if ":" not in element_id.rsplit(".", 1)[-1]:
            return None
        for type_ in self.elements.get(element_id, {}).get("type", []):
            if type_.get("code") == "Extension" and type_.get("profile"):
                return type_["profile"][0]
        return self.elements.get(f"{element_id}.url", {}).get("fixedUri")

    def select(self, root: Node, element_id: str) -> tuple[list[Node], list[Node]]:
        """(parents, values) of an element id: the instances of its parent element and its own instances."""
        segments = element_id.split(".")
        nodes = [root]
        parents = [root]
        for depth in range(1, len(segments)):
            parents = nodes
            prefix = ".".join(segments[: depth + 1])
            nodes = [c for p in parents for c in _children(p, segments[depth], self.slice_url(prefix))]
        return parents, nodes


# --- Checks ---------------------------------------------------------------------------------------------------------

def _check_cardinality(element: dict, profile: Profile, root: Node) -> Iterator[Issue]:
    """Element min/max per parent instance (elementdefinition.html#min-max)."""
    if "min" not in element and "max" not in element:
        return
    element_id = element.get("id", element["path"])
    if "." not in element_id:
        return
    parents, _ = profile.select(root, element_id)
    last = element_id.rsplit(".", 1)[1]
    slice_url = profile.slice_url(element_id)
    low, high = element.get("min", 0), element.get("max", "*")
    for parent in parents:
        count = len(_children(parent, last, slice_url))
        where = f"{parent.expression}.{_where(last, slice_url)}"
        if count < low:
            yield Issue(Severity.ERROR, Code.REQUIRED, where, f"{element_id}: minimum required = {low}, found {count}")
        if high != "*" and count > int(high):
            yield Issue(Severity.ERROR, Code.STRUCTURE, where, f"{element_id}: maximum allowed = {high}, found {count}")


def _where(segment: str, slice_url: str | None) -> str:
    name = segment.split(":")[0]
    return f"{name}('{slice_url}')" if slice_url and name == "extension" else name


def _matches_pattern(value: Any, pattern: Any) -> bool:
    """Whether ``value`` contains ``pattern`` (elementdefinition.html#pattern: every pattern item is present)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(_matches_pattern(value.get(k), v) for k, v in pattern.items())
    if isinstance(pattern, list):
        values = _as_list(value)
        return all(any(_matches_pattern(v, p) for v in values) for p in pattern)
    return value == pattern


def _check_values(element: dict, nodes: list[Node]) -> Iterator[Issue]:
    """fixed[x] equals exactly, pattern[x] is contained (elementdefinition.html#fixed, #pattern)."""
    for key, wanted in element.items():
        exact = key.startswith("fixed")
        if not (exact or key.startswith("pattern")):
            continue
        for node in nodes:
            ok = node.value == wanted if exact else _matches_pattern(node.value, wanted)
            if not ok:
                kind = "fixed" if exact else "pattern"
                yield Issue(Severity.ERROR, Code.VALUE, node.expression,
                            f"{element['path']}: value does not match the {kind} value {json.dumps(wanted)}")


def _in_value_set(value: Any, expansion: Expansion) -> bool:
    if isinstance(value, str):
        return expansion.has_code(value)
    if isinstance(value, dict) and "coding" in value:
        return any(expansion.has_coding(c.get("system"), c.get("code")) for c in value["coding"])
    if isinstance(value, dict):
        return expansion.has_coding(value.get("system"), value.get("code"))
    return False


def _check_binding(path: str, vs_url: str, nodes: list[Node], registry: Registry) -> Iterator[Issue]:
    """A required binding: code, Coding or one coding of a CodeableConcept in the value set (terminologies.html)."""
    expansion = registry.value_sets[vs_url.split("|")[0]]
    for node in nodes:
        if not _in_value_set(node.value, expansion):
            yield Issue(Severity.ERROR, Code.CODE_INVALID, node.expression,
                        f"{path}: code not in the required value set {vs_url}")


def _reference_type(reference: dict, root_resource: dict) -> str | None:
    """The resource type a Reference points to, if it can be told (references.html#literal)."""
    if reference.get("type"):
        return reference["type"]
    literal = reference.get("reference", "")
    if literal.startswith("#"):
        contained = [c for c in root_resource.get("contained", []) if c.get("id") == literal[1:]]
        return contained[0].get("resourceType") if contained else None
    match = re.search(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$", literal)
    return match.group(1) if match else None


def _check_targets(element: dict, nodes: list[Node], resource: dict) -> Iterator[Issue]:
    """Reference targets allowed by ``type.targetProfile`` (elementdefinition.html#targetProfile)."""
    targets = {t.rsplit("/", 1)[1] for type_ in element.get("type", []) if type_.get("code") == "Reference"
               for t in type_.get("targetProfile", []) if t.startswith(HL7_SD)}
    if not targets or "Resource" in targets:
        return
    for node in nodes:
        found = _reference_type(node.value, resource) if isinstance(node.value, dict) else None
        if found is not None and found not in targets:
            yield Issue(Severity.ERROR, Code.VALUE, node.expression,
                        f"{element['path']}: reference to {found}, expected {' | '.join(sorted(targets))}")


def _check_choice_types(element: dict, nodes: list[Node]) -> Iterator[Issue]:
    """The type of a ``[x]`` element is one of ``type.code`` (formats.html#choice)."""
    if not element["path"].endswith("[x]") or not element.get("type"):
        return
    allowed = {element["path"].rsplit(".", 1)[1][:-3] + t["code"][0].upper() + t["code"][1:] for t in element["type"]}
    for node in nodes:
        if node.key not in allowed:
            yield Issue(Severity.ERROR, Code.STRUCTURE, node.expression,
                        f"{element['path']}: type must be one of {sorted(allowed)}")


@functools.lru_cache(maxsize=256)
def _compiled(expression: str):
    """An invariant parsed once (fhirpathpy ``compile``, R4 model for choice types)."""
    return compile_fhirpath(expression, _FHIRPATH_MODELS["r4"])


def _evaluate(node: Node, sd_type: str, expression: str, is_root: bool) -> bool | None:
    """Evaluate an invariant on one node; None if fhirpathpy cannot evaluate it (fhirpath.html)."""
    data = node.value
    if is_root and isinstance(data, dict) and "resourceType" not in data:
        data = {"resourceType": sd_type, **data}  # lets fhirpathpy resolve value[x] on datatypes
    try:
        result = _compiled(expression)(data, {})
    except Exception:  # noqa: BLE001 - a foreign library's failure on one expression is reported, not raised
        return None
    return result == [True] or (bool(result) and all(r is True for r in result))


def _check_invariants(element: dict, nodes: list[Node], sd_type: str) -> Iterator[Issue]:
    """Each ``constraint.expression`` is true on every instance of the element (conformance-rules.html#constraints)."""
    is_root = "." not in element.get("id", element["path"])
    for constraint in element.get("constraint", []):
        for node in nodes:
            ok = _evaluate(node, sd_type, constraint["expression"], is_root)
            if ok is None:
                yield Issue(Severity.ERROR, Code.INVARIANT, node.expression,
                            f"{constraint['key']}: invariant could not be evaluated")
            elif not ok:
                yield Issue(constraint.get("severity", Severity.ERROR), Code.INVARIANT, node.expression,
                            f"{constraint['key']}: {constraint['human']}")


def _check_profile(profile: Profile, root: Node, resource: dict, registry: Registry) -> Iterator[Issue]:
    """All checks of one StructureDefinition's differential against the instance at ``root``."""
    sd_type = profile.sd["type"]
    for element_id, element in profile.elements.items():
        _, nodes = profile.select(root, element_id)
        yield from _check_cardinality(element, profile, root)
        yield from _check_values(element, nodes)
        binding = element.get("binding", {})
        if binding.get("strength") == REQUIRED_STRENGTH and "valueSet" in binding:
            yield from _check_binding(element["path"], binding["valueSet"], nodes, registry)
        yield from _check_targets(element, nodes, resource)
        yield from _check_choice_types(element, nodes)
        yield from _check_invariants(element, nodes, sd_type)


def _extensions(node: Node) -> Iterator[Node]:
    """Every extension in the instance, with its expression (extensibility.html)."""
    if isinstance(node.value, dict):
        for key, value in node.value.items():
            if key in ("contained", "resourceType"):
                continue
            for child in _children(node, key, None):
                if key in ("extension", "modifierExtension"):
                    yield child
                yield from _extensions(child)


def _check_known_extensions(root: Node, resource: dict, registry: Registry) -> Iterator[Issue]:
    """Validate each extension whose url is a known extension StructureDefinition."""
    for ext in _extensions(root):
        sd = registry.structure_definitions.get(ext.value.get("url", "")) if isinstance(ext.value, dict) else None
        if sd is not None and sd.get("type") == "Extension":
            yield from _check_profile(Profile.of(sd), ext, resource, registry)


def _base_bindings(resource: dict, registry: Registry) -> Iterator[Issue]:
    """The R4 base resource's required bindings (``BASE_BINDINGS``)."""
    root = Node(resource["resourceType"], resource)
    for path, vs_url in BASE_BINDINGS.get(resource["resourceType"], {}).items():
        nodes = [root]
        for segment in path.split(".")[1:]:
            nodes = [child for node in nodes for child in _children(node, segment, None)]
        yield from _check_binding(path, vs_url, nodes, registry)


def profiles_for(resource: dict, registry: Registry) -> list[str]:
    """The profiles a resource is checked against: its known ``meta.profile`` entries, else its type's default."""
    claimed = [p.split("|")[0] for p in resource.get("meta", {}).get("profile", [])]
    known = [p for p in claimed if p in registry.structure_definitions]
    if known:
        return known
    rtype = resource.get("resourceType")
    if rtype == "Endpoint":
        ct = resource.get("connectionType") or {}
        default = DEFAULT_ENDPOINT_PROFILE_BY_CONNECTION.get((ct.get("system"), ct.get("code")))
    else:
        default = DEFAULT_PROFILE_BY_TYPE.get(rtype)
    return [default] if default else []


def validate_resource(resource: dict, registry: Registry | None = None) -> list[Issue]:
    """All issues of ``resource`` against its profiles and base required bindings; empty = valid (validation.html)."""
    registry = registry or load_registry()
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        return [Issue(Severity.ERROR, Code.STRUCTURE, "resourceType", "resourceType is missing")]
    root = Node(rtype, resource)
    issues: list[Issue] = list(_base_bindings(resource, registry))
    for url in profiles_for(resource, registry):
        sd = registry.structure_definitions[url]
        if sd.get("type") != rtype:
            issues.append(Issue(Severity.ERROR, Code.STRUCTURE, f"{rtype}.meta.profile",
                                f"profile {url} is for {sd.get('type')}, not {rtype}"))
            continue
        issues.extend(_check_profile(Profile.of(sd), root, resource, registry))
    issues.extend(_check_known_extensions(root, resource, registry))
    return list(dict.fromkeys(issues))
