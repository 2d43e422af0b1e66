"""The CapabilityStatement (FHIR R4 6.3.0) and SMART configuration, generated from what is implemented.

Resource types come from ``model.SUPPORTED_TYPES``, search parameters from ``params.PARAMS`` and
``params.COMMON``, interactions and flags from ``INTERACTIONS`` below (the ones ``service.FhirService`` serves).
"""

from __future__ import annotations

from server import __version__
from server.fhir.model import READ_ONLY_TYPES, SUPPORTED_TYPES
from server.fhir.params import COMMON, PARAMS
from server.fhir.profiles import known_profiles

FHIR_VERSION = "4.0.1"
INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create",
                "search-type")
READ_INTERACTIONS = ("read", "vread", "history-instance", "history-type", "search-type")
PROJECTION_INTERACTIONS = ("read", "vread", "search-type")
SYSTEM_INTERACTIONS: tuple[str, ...] = ("transaction", "batch")
SCOPES = ("system/*.cruds", "system/*.rs", "system/<Resource>.<c?r?u?d?s?>", "system/*.read", "system/*.write")


def _search_params(rtype: str) -> list[dict]:
    out = [{"name": name, "type": kind} for name, kind in COMMON.items()]
    out += [{"name": name, "type": p.type} for name, p in sorted(PARAMS.get(rtype, {}).items())]
    return out


def _interactions(rtype: str) -> tuple[str, ...]:
    if rtype == "ImagingStudy":
        return PROJECTION_INTERACTIONS
    return READ_INTERACTIONS if rtype in READ_ONLY_TYPES else INTERACTIONS


def _resource(rtype: str) -> dict:
    writable = rtype not in READ_ONLY_TYPES
    refs = sorted(f"{rtype}:{name}" for name, p in PARAMS.get(rtype, {}).items()
                  if p.type == "reference" and rtype != "ImagingStudy")  # a projection has no reference index
    revs = sorted(f"{src}:{name}" for src, table in PARAMS.items() for name, p in table.items()
                  if p.type == "reference" and (not p.targets or rtype in p.targets))
    profiles = sorted(url for url, sd in known_profiles().items()
                      if sd.get("type") == rtype and sd.get("derivation") == "constraint")
    return {
        "type": rtype,
        **({"supportedProfile": profiles} if profiles else {}),
        "interaction": [{"code": code} for code in _interactions(rtype)],
        "versioning": "versioned-update" if writable else "versioned",
        "readHistory": rtype != "ImagingStudy",
        "updateCreate": writable,
        "conditionalCreate": writable,
        "conditionalRead": "not-supported",
        "conditionalUpdate": writable,
        "conditionalDelete": "not-supported",
        "searchInclude": refs,
        "searchRevInclude": revs,
        "searchParam": _search_params(rtype),
        "operation": [{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}],
    }


def capability_statement(base: str) -> dict:
    """The server's CapabilityStatement (kind instance, JSON only)."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "software": {"name": "telerad-bridge", "version": __version__},
        "implementation": {"description": "telerad-bridge FHIR R4 server", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", "xml", "application/fhir+json", "application/fhir+xml"],
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "description": "Bearer tokens (RFC 6750) with SMART v2 system scopes, from the token endpoint "
                               "(client credentials, SMART Backend Services; see .well-known/smart-configuration) "
                               "or issued offline by `telerad token`. Every resource belongs to the token's tenant.",
            },
            "resource": [_resource(t) for t in SUPPORTED_TYPES],
            "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
        }],
    }


def smart_configuration(base: str) -> dict:
    """SMART App Launch 2.0 discovery (``.well-known/smart-configuration``) for SMART Backend Services.

    ``base`` is the FHIR base URL; the token endpoint (``/auth/token``, client credentials grant) sits beside
    it. Clients are registered with ``telerad client add``; ``telerad token`` still issues tokens offline.
    """
    root = base[: -len("/fhir")] if base.endswith("/fhir") else base
    return {
        "issuer": "telerad-bridge",
        "token_endpoint": f"{root}/auth/token",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": list(SCOPES),
        "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric", "permission-v2"],
        "code_challenge_methods_supported": [],
    }
