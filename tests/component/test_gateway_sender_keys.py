"""sender_keys: the directory keys a mail from an address may be signed with, on both backends."""

from __future__ import annotations

import pytest

from server.crypto import export_public_key, generate_key
from server.gateway.directory import SiteRow, import_bundle, sender_keys, site_resources
from tests.component.test_gateway_directory import service  # noqa: F401  (the directory's FhirService fixture)

T = "site-b"


@pytest.fixture(scope="module")
def keys():
    return [generate_key(f"Site {n} <dicom@{n}.example>", bits=2048).public() for n in ("a", "c", "d")]


def row(site_id: str, address: str, key) -> tuple[SiteRow, str]:
    armored = export_public_key(key).decode("ascii")
    return SiteRow(line=1, site_id=site_id, organization=f"Klinikum {site_id}", city="Bremen", telematik_id=None,
                   address=address, max_mail_size=None, drg_profile_version="1.7", public_key=armored,
                   network=None), armored


def seed(service, tenant, *rows) -> None:
    resources = [r for site_row, armored in rows for r in site_resources(site_row, armored)]
    import_bundle(service, tenant, {"resourceType": "Bundle", "type": "transaction",
                                    "entry": [{"resource": r} for r in resources]})


def test_keys_by_address_exact_any_case_and_per_tenant(service, keys):
    a, c, d = keys
    seed(service, T, row("a", "dicom@a.example", a), row("a2", "Dicom@A.example", c),
         row("ab", "dicom@a.example.org", d))
    found = sender_keys(service, T, "<DICOM@a.example>")
    assert sorted(k.fingerprint for k in found) == sorted([a.fingerprint, c.fingerprint])
    assert [k.fingerprint for k in sender_keys(service, T, "mailto:dicom@a.example.org")] == [d.fingerprint]
    assert sender_keys(service, T, "nobody@a.example") == []
    assert sender_keys(service, T, "") == []
    assert sender_keys(service, "site-x", "dicom@a.example") == []  # another tenant's directory


def test_an_inactive_endpoint_is_skipped(service, keys):
    a, c, _ = keys
    seed(service, T, row("a", "dicom@a.example", a), row("c", "dicom@c.example", c))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    for eid, change in (("a-dicom-email", {"status": "off"}),):
        ep = next(r for r in site_resources(*row("a", "dicom@a.example", a)) if r["resourceType"] == "Endpoint")
        ep.update(change)
        bundle["entry"].append({"resource": ep})
    import_bundle(service, T, bundle)
    assert sender_keys(service, T, "dicom@a.example") == []
    assert [k.fingerprint for k in sender_keys(service, T, "dicom@c.example")] == [c.fingerprint]
