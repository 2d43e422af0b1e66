"""The network directory: recipients of DICOM e-mail and the import of the operator's site lists.

Backed by FHIR Organization <- HealthcareService -> Endpoint (gematik FHIR-VZD shape, DESIGN.md section 3); a
DICOM e-mail Endpoint follows our ``dicom-email-endpoint`` profile (profiles/README.md). Everything goes through
``FhirService`` (validation, referential integrity, AuditEvents); no SQL here.

    recipient_of(service, tenant, reference)   the Recipient of an Endpoint, HealthcareService or Organization
    sender_keys(service, tenant, address)      the public keys a mail from ``address`` may be signed with
    parse_csv(text)                            the operator's CSV as SiteRows and RowErrors (pure)
    site_resources(row, armored_key)           Organization + HealthcareService + Endpoint of one row (pure)
    import_bundle / import_csv / import_file   bulk import, one FHIR transaction (all or nothing)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.crypto import OpenPGPError, PublicKey, encryption_key, export_public_key, import_public_key
from server.errors import ErrorKind, ServerError
from server.fhir.bundle import BundleProcessor
from server.fhir.service import FhirService
from server.gateway.sites import normalize_address
from server.security.tokens import Principal

log = logging.getLogger(__name__)

BASE = "https://telerad-bridge.de/fhir"
SD = f"{BASE}/StructureDefinition"
CONNECTION_TYPES = f"{BASE}/CodeSystem/endpoint-connection-type"
DICOM_EMAIL = "dicom-email"
NETWORK_SYSTEM = f"{BASE}/CodeSystem/network"
EXT_KEY = f"{SD}/openpgp-public-key"
EXT_FINGERPRINT = f"{SD}/openpgp-fingerprint"
EXT_MAX_SIZE = f"{SD}/max-mail-size"
EXT_PROFILE = f"{SD}/drg-profile-version"
TELEMATIK_ID = "https://gematik.de/fhir/sid/telematik-id"
DEFAULT_MAX_MAIL_SIZE = 20 * 1024 * 1024  # bytes; until the settings carry a network default
DIRECTORY_TYPES = ("Organization", "HealthcareService", "Endpoint")
SYSTEM_SCOPES = frozenset({"system/*.cruds"})


def system_principal(tenant: str) -> Principal:
    """The gateway acting for ``tenant`` (directory reads and imports, not a client's token)."""
    return Principal(subject="telerad-gateway", tenant=tenant, scopes=SYSTEM_SCOPES)


# ------------------------------------------------------------------------------------------------- recipients


@dataclass(frozen=True)
class Recipient:
    """Where and how to send DICOM e-mail to one site: from its dicom-email Endpoint."""

    endpoint_id: str
    address: str
    public_key: PublicKey
    max_mail_size: int
    drg_profile_version: str

    @property
    def fingerprint(self) -> str:
        """The v4 fingerprint of the recipient's key (RFC 4880 section 12.2)."""
        return self.public_key.fingerprint


def _extension(resource: dict, url: str) -> dict | None:
    return next((e for e in resource.get("extension", []) if isinstance(e, dict) and e.get("url") == url), None)


def _is_dicom_email(endpoint: dict) -> bool:
    ctype = endpoint.get("connectionType") or {}
    return ctype.get("system") == CONNECTION_TYPES and ctype.get("code") == DICOM_EMAIL


def _ref_id(reference: object, rtype: str) -> str | None:
    if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
        kind, _, rid = reference["reference"].rpartition("/")
        if kind.rsplit("/", 1)[-1] == rtype and rid:
            return rid
    return None


def recipient_from_endpoint(endpoint: dict, *, default_max_mail_size: int = DEFAULT_MAX_MAIL_SIZE,
                            now: int | None = None) -> Recipient:
    """The Recipient of one dicom-email Endpoint resource; INVALID naming the element at fault."""
    eid = endpoint.get("id", "?")
    where = f"Endpoint/{eid}"
    if not _is_dicom_email(endpoint):
        raise ServerError(ErrorKind.INVALID, f"{where} is no DICOM e-mail endpoint",
                          parameter="Endpoint.connectionType")
    if endpoint.get("status") != "active":
        raise ServerError(ErrorKind.INVALID, f"{where} is not active (status {endpoint.get('status')!r})",
                          parameter="Endpoint.status")
    address = endpoint.get("address")
    if not isinstance(address, str) or not address.lower().startswith("mailto:") or "@" not in address:
        raise ServerError(ErrorKind.INVALID, f"{where} has no mailto: address", parameter="Endpoint.address")
    key_ext = _extension(endpoint, EXT_KEY)
    if not key_ext or not isinstance(key_ext.get("valueString"), str):
        raise ServerError(ErrorKind.INVALID, f"{where} has no OpenPGP public key",
                          parameter=f"Endpoint.extension('{EXT_KEY}')")
    try:
        key = import_public_key(key_ext["valueString"].encode("utf-8"))
    except OpenPGPError as exc:
        raise ServerError(ErrorKind.INVALID, f"{where}: invalid OpenPGP public key: {exc.message}",
                          parameter=f"Endpoint.extension('{EXT_KEY}')") from exc
    fpr_ext = _extension(endpoint, EXT_FINGERPRINT) or {}
    fingerprint = str(fpr_ext.get("valueString", "")).replace(" ", "").upper()
    if fingerprint != key.fingerprint:
        raise ServerError(ErrorKind.INVALID, f"{where}: the fingerprint {fingerprint or '(none)'} does not match "
                          f"its key {key.fingerprint}", parameter=f"Endpoint.extension('{EXT_FINGERPRINT}')")
    try:
        encryption_key(key, now=now)
    except OpenPGPError as exc:
        raise ServerError(ErrorKind.INVALID, f"{where}: the OpenPGP key cannot be used: {exc.message}",
                          parameter=f"Endpoint.extension('{EXT_KEY}')") from exc
    size = (_extension(endpoint, EXT_MAX_SIZE) or {}).get("valueInteger", default_max_mail_size)
    version = (_extension(endpoint, EXT_PROFILE) or {}).get("valueCode")
    if not isinstance(version, str):
        raise ServerError(ErrorKind.INVALID, f"{where} has no DRG profile version",
                          parameter=f"Endpoint.extension('{EXT_PROFILE}')")
    return Recipient(endpoint_id=eid, address=address[len("mailto:"):], public_key=key, max_mail_size=int(size),
                     drg_profile_version=version)


class _Reader:
    """Reads of one tenant's directory inside one store transaction."""

    def __init__(self, service: FhirService, tx, principal: Principal) -> None:
        self.service, self.tx, self.principal = service, tx, principal

    def read(self, rtype: str, rid: str) -> dict | None:
        try:
            return self.service.read_in(self.tx, self.principal, rtype, rid).resource
        except ServerError as exc:
            if exc.kind is ErrorKind.NOT_FOUND or getattr(exc, "status", None) == 410:
                return None
            raise

    def search(self, rtype: str, items: list[tuple[str, str]]) -> list[dict]:
        bundle = self.service.search_in(self.tx, self.principal, rtype, [*items, ("_count", "1000")], base="")
        return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def _candidates(reader: _Reader, rtype: str, rid: str) -> list[dict]:
    """The Endpoints reachable from ``rtype/rid``; NOT_FOUND when it does not exist."""
    resource = reader.read(rtype, rid)
    if resource is None:
        raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid} not found in the directory", parameter=rtype)
    if rtype == "Endpoint":
        return [resource]
    services = [resource] if rtype == "HealthcareService" else \
        reader.search("HealthcareService", [("organization", f"Organization/{rid}")])
    found: dict[str, dict] = {}
    for service in services:
        for ref in service.get("endpoint", []):
            eid = _ref_id(ref, "Endpoint")
            endpoint = reader.read("Endpoint", eid) if eid else None
            if endpoint is not None:
                found[eid] = endpoint
    if rtype == "Organization":
        for endpoint in reader.search("Endpoint", [("organization", f"Organization/{rid}")]):
            found[endpoint["id"]] = endpoint
    return [found[k] for k in sorted(found)]


def recipient_of(service: FhirService, tenant: str, reference: str, *,
                 default_max_mail_size: int = DEFAULT_MAX_MAIL_SIZE, now: int | None = None) -> Recipient:
    """The DICOM e-mail recipient of ``Endpoint/id``, ``HealthcareService/id`` or ``Organization/id`` (a bare id
    is an Endpoint id) in ``tenant``'s directory.

    A HealthcareService leads to its ``endpoint``s; an Organization to the endpoints of the services it provides
    and to the Endpoints it manages (``managingOrganization``). The active dicom-email Endpoint is chosen (the
    first by id when several are). Errors: NOT_FOUND for an unknown resource or no dicom-email Endpoint,
    INVALID naming the element for an inactive endpoint, a missing/invalid/expired/revoked key or a fingerprint
    that does not match the key.
    """
    rtype, _, rid = reference.rpartition("/")
    rtype = rtype or "Endpoint"
    if rtype not in DIRECTORY_TYPES or not rid:
        raise ServerError(ErrorKind.INVALID, f"a recipient is an Endpoint, HealthcareService or Organization, not "
                          f"{reference!r}", parameter="recipient")
    with service.store.transaction(tenant, write=False) as tx:
        endpoints = _candidates(_Reader(service, tx, system_principal(tenant)), rtype, rid)
    mail = [e for e in endpoints if _is_dicom_email(e)]
    if not mail:
        raise ServerError(ErrorKind.NOT_FOUND, f"{rtype}/{rid} has no DICOM e-mail endpoint (connectionType "
                          f"{CONNECTION_TYPES}|{DICOM_EMAIL})", parameter="Endpoint.connectionType")
    active = [e for e in mail if e.get("status") == "active"]
    return recipient_from_endpoint(active[0] if active else mail[0], default_max_mail_size=default_max_mail_size,
                                   now=now)


def recipient_by_address(service: FhirService, tenant: str, address: str, *,
                         default_max_mail_size: int = DEFAULT_MAX_MAIL_SIZE) -> Recipient:
    """The DICOM e-mail recipient of the site ``address`` in ``tenant``'s directory (its active Endpoint with that
    address, the first by id): where replies to a site that sent us an order go. NOT_FOUND when there is none."""
    want = normalize_address(address)
    query = [("address", f"mailto:{want}".replace(",", "\\,")),
             ("connection-type", f"{CONNECTION_TYPES}|{DICOM_EMAIL}"), ("status", "active")]
    with service.store.transaction(tenant, write=False) as tx:
        endpoints = _Reader(service, tx, system_principal(tenant)).search("Endpoint", query)
    endpoints = sorted((e for e in endpoints if isinstance(e.get("address"), str)
                        and normalize_address(e["address"]) == want), key=lambda e: str(e.get("id")))
    if not want or not endpoints:
        raise ServerError(ErrorKind.NOT_FOUND, f"no active DICOM e-mail Endpoint with the address {want or '?'} in "
                          "the directory", parameter="Endpoint.address")
    return recipient_from_endpoint(endpoints[0], default_max_mail_size=default_max_mail_size)


def sender_keys(service: FhirService, tenant: str, address: str) -> list[PublicKey]:
    """The OpenPGP public keys of the active dicom-email Endpoints of ``address`` in ``tenant``'s directory: the
    keys a mail from that address may be signed with (DESIGN.md 4: keys come from the directory, never guessed).

    Endpoints are found by our ``address`` search parameter and compared exactly (``mailto:``, any case); an
    Endpoint whose key cannot be read or does not match its fingerprint extension is skipped (logged). Empty
    when the address is unknown. Caching is the caller's business (the gateway's Inbound keeps an address's keys
    for a minute, never an empty answer).
    """
    want = normalize_address(address)
    if not want or "@" not in want:
        return []
    value = want.replace(",", "\\,")  # a comma separates alternatives (FHIR R4 3.1.1.4.11)
    query = [("address", f"mailto:{value}"), ("connection-type", f"{CONNECTION_TYPES}|{DICOM_EMAIL}"),
             ("status", "active")]
    with service.store.transaction(tenant, write=False) as tx:
        endpoints = _Reader(service, tx, system_principal(tenant)).search("Endpoint", query)
    keys: list[PublicKey] = []
    for endpoint in sorted(endpoints, key=lambda e: str(e.get("id"))):
        where = f"Endpoint/{endpoint.get('id', '?')}"
        if not isinstance(endpoint.get("address"), str) or normalize_address(endpoint["address"]) != want:
            continue
        key_ext = _extension(endpoint, EXT_KEY) or {}
        try:
            key = import_public_key(str(key_ext.get("valueString", "")).encode("utf-8"))
        except OpenPGPError as exc:
            log.error("%s of %s in %s's directory: unusable OpenPGP key: %s", where, want, tenant, exc.message)
            continue
        fingerprint = str((_extension(endpoint, EXT_FINGERPRINT) or {}).get("valueString", "")).replace(" ", "")
        if fingerprint and fingerprint.upper() != key.fingerprint:
            log.error("%s of %s in %s's directory: the fingerprint %s does not match its key %s", where, want,
                      tenant, fingerprint, key.fingerprint)
            continue
        if all(k.fingerprint != key.fingerprint for k in keys):
            keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class RowError:
    """A row of an import that failed: its line in the file (1-based) and why."""

    line: int
    message: str


@dataclass(frozen=True)
class ImportReport:
    """The outcome of an import: resources created and updated, rows that failed (nothing imported from them)."""

    created: int
    updated: int
    errors: tuple[RowError, ...] = ()


@dataclass(frozen=True)
class SiteRow:
    """One site of the operator's CSV (see the README, "Directory import")."""

    line: int
    site_id: str
    organization: str
    city: str
    telematik_id: str | None
    address: str
    max_mail_size: int | None
    drg_profile_version: str
    public_key: str        # armored key, or a path to a .asc file (relative to the CSV's folder)
    network: str | None

    @property
    def key_is_path(self) -> bool:
        """Whether ``public_key`` names a file rather than holding the armored key."""
        return "-----BEGIN PGP" not in self.public_key


CSV_COLUMNS = ("site_id", "organization", "city", "telematik_id", "address", "max_mail_size",
               "drg_profile_version", "public_key", "network")
REQUIRED_COLUMNS = ("site_id", "organization", "city", "address", "drg_profile_version", "public_key")
PROFILE_VERSIONS = ("1.5", "1.6", "1.7")
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-.]{0,39}$")
_ADDRESS = re.compile(r"^[^\s@<>\"(),;:]+@[^\s@<>\"(),;:]+\.[^\s@<>\"(),;:]+$")


def _row(line: int, values: dict[str, str]) -> SiteRow:
    v = {k: (values.get(k) or "").strip() for k in CSV_COLUMNS}
    missing = [k for k in REQUIRED_COLUMNS if not v[k]]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not _SITE_ID.match(v["site_id"]):
        raise ValueError(f"site_id {v['site_id']!r}: letters, digits, '-' and '.', at most 40")
    address = v["address"][len("mailto:"):] if v["address"].lower().startswith("mailto:") else v["address"]
    if not _ADDRESS.match(address):
        raise ValueError(f"address {v['address']!r} is no mail address")
    size = None
    if v["max_mail_size"]:
        if not v["max_mail_size"].isdigit() or int(v["max_mail_size"]) <= 0:
            raise ValueError(f"max_mail_size {v['max_mail_size']!r} is no positive number of bytes")
        size = int(v["max_mail_size"])
    if v["drg_profile_version"] not in PROFILE_VERSIONS:
        raise ValueError(f"drg_profile_version {v['drg_profile_version']!r} is not one of "
                         f"{', '.join(PROFILE_VERSIONS)}")
    return SiteRow(line, v["site_id"], v["organization"], v["city"], v["telematik_id"] or None, address, size,
                   v["drg_profile_version"], v["public_key"], v["network"] or None)


def parse_csv(text: str) -> list[SiteRow | RowError]:
    """The rows of the operator's CSV (header row with the CSV_COLUMNS names, RFC 4180 quoting; ``,`` or ``;``).

    Each data row becomes a SiteRow, or a RowError with the line it starts on; a bad header is one RowError
    on line 1. Duplicate site ids are errors on the later rows.
    """
    text = text.lstrip("\ufeff")
    first = text.split("\n", 1)[0]
    dialect = "excel" if first.count(",") >= first.count(";") else _Semicolon
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return [RowError(1, "empty file")]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if unknown or missing:
        what = ([f"unknown column(s) {', '.join(unknown)}"] if unknown else []) + \
               ([f"missing column(s) {', '.join(missing)}"] if missing else [])
        return [RowError(1, "; ".join(what))]
    out: list[SiteRow | RowError] = []
    seen: dict[str, int] = {}
    line = reader.line_num + 1
    for values in reader:
        start, line = line, reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            out.append(RowError(start, f"{len(values)} fields, the header has {len(header)}"))
            continue
        try:
            row = _row(start, dict(zip(header, values)))
        except ValueError as exc:
            out.append(RowError(start, str(exc)))
            continue
        if row.site_id in seen:
            out.append(RowError(start, f"site_id {row.site_id!r} repeats line {seen[row.site_id]}"))
            continue
        seen[row.site_id] = start
        out.append(row)
    return out


class _Semicolon(csv.excel):
    delimiter = ";"


def site_ids(site_id: str) -> tuple[str, str, str]:
    """The ids of a site's Organization, HealthcareService and dicom-email Endpoint (stable: re-import updates)."""
    return site_id, f"{site_id}-teleradiology", f"{site_id}-dicom-email"


def site_resources(row: SiteRow, armored_key: str) -> list[dict]:
    """Organization, HealthcareService and dicom-email Endpoint of one CSV row; the fingerprint comes from the key.

    INVALID when the key is not one valid OpenPGP public key.
    """
    key = import_public_key(armored_key.encode("utf-8"))
    org_id, service_id, endpoint_id = site_ids(row.site_id)
    org = {"resourceType": "Organization", "id": org_id, "active": True, "name": row.organization,
           "address": [{"city": row.city}]}
    if row.telematik_id:
        org["identifier"] = [{"system": TELEMATIK_ID, "value": row.telematik_id}]
    extensions = [{"url": EXT_KEY, "valueString": export_public_key(key).decode("ascii")},
                  {"url": EXT_FINGERPRINT, "valueString": key.fingerprint}]
    if row.max_mail_size is not None:
        extensions.append({"url": EXT_MAX_SIZE, "valueInteger": row.max_mail_size})
    extensions.append({"url": EXT_PROFILE, "valueCode": row.drg_profile_version})
    endpoint = {"resourceType": "Endpoint", "id": endpoint_id, "meta": {"profile": [f"{SD}/dicom-email-endpoint"]},
                "extension": extensions, "status": "active", "name": f"DICOM E-Mail {row.organization}",
                "connectionType": {"system": CONNECTION_TYPES, "code": DICOM_EMAIL},
                "payloadType": [{"text": "DICOM"}], "payloadMimeType": ["application/dicom"],
                "managingOrganization": {"reference": f"Organization/{org_id}"}, "address": f"mailto:{row.address}"}
    service = {"resourceType": "HealthcareService", "id": service_id, "active": True,
               "name": f"Teleradiologie {row.organization}", "providedBy": {"reference": f"Organization/{org_id}"},
               "endpoint": [{"reference": f"Endpoint/{endpoint_id}"}]}
    if row.network:
        service["program"] = [{"text": row.network}]
    return [org, endpoint, service]


def _put(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


def _counts(response: dict) -> tuple[int, int]:
    statuses = [e.get("response", {}).get("status", "") for e in response.get("entry", [])]
    return sum(s.startswith("201") for s in statuses), sum(s.startswith("200") for s in statuses)


_ENTRY = re.compile(r"^Bundle\.entry\[(\d+)\]: ")


def _transaction(service: FhirService, tenant: str, resources: list[dict]) -> tuple[int, int]:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [_put(r) for r in resources]}
    return _counts(BundleProcessor(service).process(system_principal(tenant), bundle, base=""))


def bundle_resources(bundle: object) -> list[dict]:
    """The directory resources of a batch, transaction or collection Bundle (each needs its id); INVALID else."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ServerError(ErrorKind.INVALID, "not a FHIR Bundle", parameter="Bundle")
    if bundle.get("type") not in ("batch", "transaction", "collection"):
        raise ServerError(ErrorKind.INVALID, "Bundle.type must be batch, transaction or collection",
                          parameter="Bundle.type")
    resources = []
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") not in DIRECTORY_TYPES:
            raise ServerError(ErrorKind.INVALID, f"Bundle.entry[{i}]: only {', '.join(DIRECTORY_TYPES)} are imported",
                              parameter=f"Bundle.entry[{i}].resource")
        if not isinstance(resource.get("id"), str):
            raise ServerError(ErrorKind.INVALID, f"Bundle.entry[{i}]: the resource needs an id (it is kept)",
                              parameter=f"Bundle.entry[{i}].resource.id")
        resources.append(resource)
    return resources


def import_bundle(service: FhirService, tenant: str, bundle: object) -> ImportReport:
    """Import a Bundle's Organizations, HealthcareServices and Endpoints by PUT in one transaction (ids kept)."""
    created, updated = _transaction(service, tenant, bundle_resources(bundle))
    return ImportReport(created, updated)


def import_csv(service: FhirService, tenant: str, text: str, *, read_key: Callable[[str], str],
               partial: bool = False) -> ImportReport:
    """Import the operator's CSV: all rows in one transaction, nothing when a row fails (unless ``partial``:
    then each good row is imported on its own and the failing rows are reported).

    ``read_key`` returns the armored key of a row whose ``public_key`` is a path (ValueError/OSError: row error).
    """
    rows: list[tuple[SiteRow, list[dict]]] = []
    errors: list[RowError] = []
    for item in parse_csv(text):
        if isinstance(item, RowError):
            errors.append(item)
            continue
        try:
            armored = read_key(item.public_key) if item.key_is_path else item.public_key
            rows.append((item, site_resources(item, armored)))
        except OpenPGPError as exc:
            errors.append(RowError(item.line, f"public_key: {exc.message}"))
        except (OSError, ValueError) as exc:
            errors.append(RowError(item.line, f"public_key: {getattr(exc, 'strerror', None) or exc}"))
    if errors and not partial:
        return ImportReport(0, 0, tuple(errors))
    if not partial:
        resources = [r for _, rs in rows for r in rs]
        try:
            created, updated = _transaction(service, tenant, resources)
        except ServerError as exc:
            if exc.kind is ErrorKind.INTERNAL:
                raise
            m = _ENTRY.match(exc.message)
            line = rows[int(m.group(1)) // 3][0].line if m else 1
            return ImportReport(0, 0, (RowError(line, _ENTRY.sub("", exc.message)),))
        return ImportReport(created, updated)
    created = updated = 0
    for row, resources in rows:
        try:
            c, u = _transaction(service, tenant, resources)
        except ServerError as exc:
            if exc.kind is ErrorKind.INTERNAL:
                raise
            errors.append(RowError(row.line, _ENTRY.sub("", exc.message)))
            continue
        created, updated = created + c, updated + u
    return ImportReport(created, updated, tuple(sorted(errors, key=lambda e: e.line)))


def key_file_reader(folder: Path) -> Callable[[str], str]:
    """Reads a row's ``.asc`` key file, relative to ``folder`` (the CSV's) unless absolute."""
    def read(name: str) -> str:
        path = Path(name)
        if path.suffix.lower() not in (".asc", ".gpg", ".pgp", ".pub"):
            raise ValueError(f"{name!r} is neither an armored key nor a key file (.asc)")
        return (path if path.is_absolute() else folder / path).read_bytes().decode("ascii", errors="replace")
    return read


def import_file(service: FhirService, tenant: str, path: Path, *, partial: bool = False) -> ImportReport:
    """Import a Bundle (``.json``) or the operator's CSV (anything else) into ``tenant``'s directory."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ServerError(ErrorKind.INVALID, f"cannot read {path}: {exc.strerror}") from exc
    if Path(path).suffix.lower() == ".json" or data.lstrip()[:1] == b"{":
        try:
            bundle = json.loads(data)
        except ValueError as exc:
            raise ServerError(ErrorKind.INVALID, f"{path} is no JSON: {exc}") from exc
        return import_bundle(service, tenant, bundle)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServerError(ErrorKind.INVALID, f"{path} is not UTF-8 text") from exc
    return import_csv(service, tenant, text, read_key=key_file_reader(Path(path).resolve().parent),
                      partial=partial)
