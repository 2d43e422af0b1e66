"""The gateway's view of the directory on both backends: recipient resolution (every error), Bundle and CSV import
(create, then update; all or nothing; --partial) through the FHIR service (validation, integrity, AuditEvents)."""

from __future__ import annotations

import json
import time

import pytest

from server.crypto import PublicKey, export_public_key, generate_key, import_public_key
from server.crypto.packets import HashAlgo, SigType, Tag, packet, read_packets
from server.crypto.signatures import key_hasher, make_signature
from server.errors import ErrorKind, ServerError
from server.gateway.directory import (ImportReport, import_bundle, import_csv, import_file, recipient_of,
                                      system_principal)

B = "https://telerad-bridge.de/fhir"
SD = f"{B}/StructureDefinition"
VZD = "https://gematik.de/fhir/directory"
BAD_KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQENBF...\n-----END PGP PUBLIC KEY BLOCK-----\n"
HEADER = "site_id,organization,city,telematik_id,address,max_mail_size,drg_profile_version,public_key,network\n"


def _revoked(key) -> PublicKey:
    primary = key.public().primary.part
    revocation = make_signature(sig_type=SigType.KEY_REVOCATION, signer=primary, private=key.private_for(primary),
                                hash_algo=HashAlgo.SHA256, hasher=key_hasher(HashAlgo.SHA256, primary))
    packets = list(read_packets(key.public().packets))
    return import_public_key(packet(packets[0].tag, bytes(packets[0].body)) + packet(Tag.SIGNATURE, revocation)
                             + b"".join(packet(p.tag, bytes(p.body)) for p in packets[1:]))


@pytest.fixture(scope="module")
def keys():
    a = generate_key("Bremen <dicom@bremen.example.de>", bits=2048)
    b = generate_key("Oldenburg <dicom@oldenburg.example.de>", bits=2048)
    expiring = generate_key("Old <dicom@old.example.de>", bits=2048, expires_in=3600)
    revoked = _revoked(generate_key("Gone <dicom@gone.example.de>", bits=2048))
    return {"a": a.public(), "b": b.public(), "expiring": expiring.public(), "revoked": revoked}


@pytest.fixture
def service(settings):
    from server.fhir.setup import build_service
    from server.store.db import make_engine
    from server.store.migrate import upgrade

    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    yield build_service(settings, engine)
    engine.dispose()


def armored(key) -> str:
    return export_public_key(key).decode("ascii")


def endpoint(eid, org, address, key_text, fingerprint, *, status="active", size=20_000_000):
    ext = [{"url": f"{SD}/openpgp-public-key", "valueString": key_text},
           {"url": f"{SD}/openpgp-fingerprint", "valueString": fingerprint}]
    if size is not None:
        ext.append({"url": f"{SD}/max-mail-size", "valueInteger": size})
    ext.append({"url": f"{SD}/drg-profile-version", "valueCode": "1.7"})
    return {"resourceType": "Endpoint", "id": eid, "meta": {"profile": [f"{SD}/dicom-email-endpoint"]},
            "extension": ext, "status": status, "name": f"DICOM E-Mail {org}",
            "connectionType": {"system": f"{B}/CodeSystem/endpoint-connection-type", "code": "dicom-email"},
            "payloadType": [{"text": "DICOM"}], "payloadMimeType": ["application/dicom"],
            "managingOrganization": {"reference": f"Organization/{org}"}, "address": f"mailto:{address}"}


def kim(eid, org):
    return {"resourceType": "Endpoint", "id": eid, "status": "active", "name": "KIM-Mailadresse",
            "connectionType": {"system": f"{VZD}/CodeSystem/EndpointDirectoryConnectionType", "code": "kim"},
            "payloadType": [{"text": "eArztbrief"}], "managingOrganization": {"reference": f"Organization/{org}"},
            "address": f"radiologie@{org}.kim.telematik"}


def org(oid):
    return {"resourceType": "Organization", "id": oid, "name": f"Klinikum {oid}", "active": True}


def healthcare(sid, oid, *endpoints):
    return {"resourceType": "HealthcareService", "id": sid, "name": f"Teleradiologie {oid}",
            "providedBy": {"reference": f"Organization/{oid}"},
            "endpoint": [{"reference": f"Endpoint/{e}"} for e in endpoints]}


def collection(*resources, kind="collection"):
    return {"resourceType": "Bundle", "type": kind, "entry": [{"resource": r} for r in resources]}


@pytest.fixture
def directory(service, keys):
    a, b = keys["a"], keys["b"]
    resources = [
        org("bremen"), kim("bremen-kim", "bremen"),
        endpoint("bremen-dicom", "bremen", "dicom@bremen.example.de", armored(a), a.fingerprint),
        healthcare("bremen-tele", "bremen", "bremen-kim", "bremen-dicom"),
        org("oldenburg"),  # its Endpoint only through managingOrganization, no max-mail-size
        endpoint("oldenburg-dicom", "oldenburg", "dicom@oldenburg.example.de", armored(b), b.fingerprint, size=None),
        org("kimonly"), kim("kimonly-kim", "kimonly"), healthcare("kimonly-tele", "kimonly", "kimonly-kim"),
        org("other"),
        endpoint("off", "other", "off@x.example.de", armored(a), a.fingerprint, status="off"),
        endpoint("badkey", "other", "bad@x.example.de", BAD_KEY, a.fingerprint),
        endpoint("mismatch", "other", "mm@x.example.de", armored(a), b.fingerprint),
        endpoint("expiring", "other", "exp@x.example.de", armored(keys["expiring"]), keys["expiring"].fingerprint),
        endpoint("revoked", "other", "rev@x.example.de", armored(keys["revoked"]), keys["revoked"].fingerprint),
    ]
    report = import_bundle(service, "site-a", collection(*resources))
    assert report == ImportReport(created=len(resources), updated=0)
    return service


@pytest.mark.parametrize("reference", ["Endpoint/bremen-dicom", "bremen-dicom", "HealthcareService/bremen-tele",
                                       "Organization/bremen"])
def test_recipient_by_endpoint_service_or_organization(directory, keys, reference):
    r = recipient_of(directory, "site-a", reference)
    assert (r.endpoint_id, r.address, r.fingerprint, r.max_mail_size, r.drg_profile_version) == \
        ("bremen-dicom", "dicom@bremen.example.de", keys["a"].fingerprint, 20_000_000, "1.7")


def test_recipient_by_managing_organization_with_default_size(directory, keys):
    r = recipient_of(directory, "site-a", "Organization/oldenburg", default_max_mail_size=12345)
    assert (r.endpoint_id, r.fingerprint, r.max_mail_size) == ("oldenburg-dicom", keys["b"].fingerprint, 12345)


@pytest.mark.parametrize("reference, kind, parameter, words", [
    ("Endpoint/nope", ErrorKind.NOT_FOUND, "Endpoint", "not found"),
    ("Organization/nope", ErrorKind.NOT_FOUND, "Organization", "not found"),
    ("HealthcareService/nope", ErrorKind.NOT_FOUND, "HealthcareService", "not found"),
    ("Organization/kimonly", ErrorKind.NOT_FOUND, "Endpoint.connectionType", "no DICOM e-mail endpoint"),
    ("Endpoint/bremen-kim", ErrorKind.NOT_FOUND, "Endpoint.connectionType", "no DICOM e-mail endpoint"),
    ("Endpoint/off", ErrorKind.INVALID, "Endpoint.status", "not active"),
    ("Endpoint/badkey", ErrorKind.INVALID, "openpgp-public-key", "invalid OpenPGP public key"),
    ("Endpoint/mismatch", ErrorKind.INVALID, "openpgp-fingerprint", "does not match"),
    ("Endpoint/revoked", ErrorKind.INVALID, "openpgp-public-key", "revoked"),
    ("Patient/x", ErrorKind.INVALID, "recipient", "Endpoint, HealthcareService or Organization"),
])
def test_recipient_errors(directory, reference, kind, parameter, words):
    with pytest.raises(ServerError) as info:
        recipient_of(directory, "site-a", reference)
    assert info.value.kind is kind and parameter in info.value.parameter and words in info.value.message


def test_expired_key_and_other_tenants(directory):
    assert recipient_of(directory, "site-a", "Endpoint/expiring").endpoint_id == "expiring"
    with pytest.raises(ServerError, match="expired") as info:
        recipient_of(directory, "site-a", "Endpoint/expiring", now=int(time.time()) + 7200)
    assert info.value.kind is ErrorKind.INVALID
    with pytest.raises(ServerError) as info:
        recipient_of(directory, "site-b", "Endpoint/bremen-dicom")
    assert info.value.kind is ErrorKind.NOT_FOUND


def test_deleted_endpoint_is_not_found(directory):
    directory.delete(system_principal("site-a"), "Endpoint", "oldenburg-dicom")
    with pytest.raises(ServerError) as info:
        recipient_of(directory, "site-a", "Endpoint/oldenburg-dicom")
    assert info.value.kind is ErrorKind.NOT_FOUND


def _count(service, rtype, tenant="site-a", **params):
    items = [("_summary", "count"), *params.items()]
    return service.search(system_principal(tenant), rtype, items, base="")["total"]


def test_bundle_import_keeps_ids_updates_and_audits(service, keys):
    a = keys["a"]
    bundle = collection(org("x"), endpoint("x-dicom", "x", "d@x.example.de", armored(a), a.fingerprint),
                        healthcare("x-tele", "x", "x-dicom"), kind="transaction")
    assert import_bundle(service, "site-a", bundle) == ImportReport(3, 0)
    assert import_bundle(service, "site-a", bundle) == ImportReport(0, 3)
    assert _count(service, "Endpoint") == 1
    assert _count(service, "AuditEvent") == 6
    assert recipient_of(service, "site-a", "Organization/x").endpoint_id == "x-dicom"


def test_bundle_import_is_all_or_nothing(service, keys):
    a = keys["a"]
    dangling = collection(org("y"), healthcare("y-tele", "y", "missing"), kind="batch")
    with pytest.raises(ServerError, match="Endpoint/missing"):
        import_bundle(service, "site-a", dangling)
    invalid = collection(org("y"), endpoint("y-dicom", "y", "d@y.example.de", armored(a), "not-hex"))
    with pytest.raises(ServerError):
        import_bundle(service, "site-a", invalid)
    assert _count(service, "Organization") == 0
    with pytest.raises(ServerError, match="only Organization"):
        import_bundle(service, "site-a", collection({"resourceType": "Patient", "id": "p"}))
    with pytest.raises(ServerError, match="needs an id"):
        import_bundle(service, "site-a", collection({"resourceType": "Organization", "name": "n"}))
    with pytest.raises(ServerError, match="Bundle.type"):
        import_bundle(service, "site-a", {"resourceType": "Bundle", "type": "searchset", "entry": []})


def _csv(keys, tmp_path, address="dicom@bremen.example.de"):
    (tmp_path / "oldenburg.asc").write_text(armored(keys["b"]))
    key = armored(keys["a"]).replace('"', '""')
    return (HEADER
            + f'bremen,Klinikum Bremen-Mitte,Bremen,5-2.58.1,{address},20000000,1.7,"{key}",'
              'Westdeutscher Teleradiologieverbund\n'
            + "oldenburg,Klinikum Oldenburg AöR,Oldenburg,,mailto:dicom@oldenburg.example.de,,1.6,oldenburg.asc,\n")


def _reader(tmp_path):
    from server.gateway.directory import key_file_reader

    return key_file_reader(tmp_path)


def test_csv_import_creates_then_updates(service, keys, tmp_path):
    text = _csv(keys, tmp_path)
    assert import_csv(service, "site-a", text, read_key=_reader(tmp_path)) == ImportReport(6, 0)
    r = recipient_of(service, "site-a", "Organization/bremen")
    assert (r.address, r.fingerprint, r.max_mail_size) == ("dicom@bremen.example.de", keys["a"].fingerprint,
                                                           20_000_000)
    r = recipient_of(service, "site-a", "Organization/oldenburg", default_max_mail_size=999)
    assert (r.address, r.fingerprint, r.max_mail_size, r.drg_profile_version) == \
        ("dicom@oldenburg.example.de", keys["b"].fingerprint, 999, "1.6")
    assert _count(service, "HealthcareService", network="westdeutscher") == 1
    assert _count(service, "Organization", identifier="https://gematik.de/fhir/sid/telematik-id|5-2.58.1") == 1
    changed = _csv(keys, tmp_path, address="neu@bremen.example.de")
    assert import_csv(service, "site-a", changed, read_key=_reader(tmp_path)) == ImportReport(0, 6)
    assert recipient_of(service, "site-a", "HealthcareService/bremen-teleradiology").address == \
        "neu@bremen.example.de"
    assert _count(service, "Endpoint") == 2 and _count(service, "Organization") == 2


def test_csv_import_is_all_or_nothing_unless_partial(service, keys, tmp_path):
    text = _csv(keys, tmp_path) + "third,Third,Berlin,,x@third.example.de,,2.0,third.asc,\n" \
        + "fourth,Fourth,Köln,,x@fourth.example.de,,1.7,missing.asc,\n"
    report = import_csv(service, "site-a", text, read_key=_reader(tmp_path))
    assert (report.created, report.updated) == (0, 0)
    lines = {e.line: e.message for e in report.errors}
    key_lines = armored(keys["a"]).count("\n")
    third = 3 + key_lines + 1
    assert set(lines) == {third, third + 1}, lines
    assert "drg_profile_version" in lines[third] and "public_key" in lines[third + 1]
    assert _count(service, "Organization") == 0
    report = import_csv(service, "site-a", text, read_key=_reader(tmp_path), partial=True)
    assert (report.created, report.updated, len(report.errors)) == (6, 0, 2)
    assert _count(service, "Organization") == 2


def test_cli_directory_import(settings, keys, tmp_path, monkeypatch, capsys):
    from server.__main__ import main

    monkeypatch.setenv("TELERAD_DATABASE_URL", settings.resolved_database_url)
    path = tmp_path / "sites.csv"
    path.write_text(_csv(keys, tmp_path))
    args = ["directory", "import", "--data-dir", str(settings.data_dir), "--tenant", "site-a", str(path)]
    assert main(args) == 0
    assert "created: 6, updated: 0, failed rows: 0" in capsys.readouterr().out
    bundle = tmp_path / "dir.json"
    a = keys["a"]
    bundle.write_text(json.dumps(collection(org("z"), endpoint("z-dicom", "z", "d@z.example.de", armored(a),
                                                               a.fingerprint))))
    assert main([*args[:-1], str(bundle)]) == 0
    assert "created: 2, updated: 0" in capsys.readouterr().out
    path.write_text(HEADER + "bad id,X,Y,,a@b.example.de,,1.7,k.asc,\n")
    assert main(args) == 1
    captured = capsys.readouterr()
    assert f"{path}:2: site_id" in captured.err and "created: 0" in captured.out


def test_import_file_refuses_garbage(service, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ServerError, match="no JSON"):
        import_file(service, "site-a", path)
