"""Teleconsult send options between two sites, end to end (issue 5): real ``telerad serve`` processes A and B on
loopback (started once for the module), a real FHIR client (fhirpy) as the EHRs of both.

* An emergency (``priority: stat``) order overtakes a running bulk transfer: it is imported at B while the bulk
  set is still incomplete, and arrives as an emergency consult (stat, NOTFALL) with its short note.
* An anonymised order: what B stores is checked attribute by attribute against PS3.15 Table E.1-1 (every
  top-level row pydicom knows, ``tests/teleconsult_data.py``), UIDs replaced consistently across the study and
  its references; with clean-descriptors + retain-longitudinal-modified-dates dates shift by one number of days
  and descriptions stay, cleaned. Free text in structured content (SR Text Value, a KOS's description) does not
  travel.
* Option combinations: key-images-only + with-report (PDF and SR reports), key-images-only + anonymised (the KOS
  points at the new UIDs); a note of 1,000 characters (not bytes) arrives unchanged.
* Bad orders get 422 + OperationOutcome and nothing is stored or sent; an order for a study not there yet waits
  (awaiting-study) and starts when it arrives.
"""

from __future__ import annotations

import io
import time

import pytest
import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome
from pydicom import dcmread
from pydicom.uid import CTImageStorage, generate_uid

from server.crypto import export_public_key, generate_key, import_public_key
from server.dicom.encapsulate import encapsulated_pdf, study_context_from
from server.dicom.kos import key_object_references
from tests.dicomdata import make_instance, multipart, sample_path
from tests.gateway_nodes import Node, telerad, wait_for
from tests.integration.test_gateway_two_nodes import _instances_at, _sets, _stow
from tests.integration.test_teleconsult_nodes import BASE, business, ehr, service_of
from tests.teleconsult_data import IDENTITY, PROFILE, ROWS, STANDARD_SPOT_CHECKS, check_instances, \
    original_uids, profile_instance
from tests.unit.test_dicom_kos import build_kos

SD = f"{BASE}/StructureDefinition"
SEND_OPTION = f"{BASE}/CodeSystem/send-option"
ORDER_SYSTEM = f"{BASE}/sid/order"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n% Vorbefund\n%%EOF\n"


# ---- the two sites, once for the module ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """A and B running, knowing each other; A sends one mail at a time in rounds of 4 (so a bulk transfer runs
    long enough to be overtaken). Each test uses its own studies."""
    root = tmp_path_factory.mktemp("teleconsult-options")
    a, b = Node(root, "a"), Node(root, "b")
    a.learn(b)
    b.learn(a)
    a.settings.update(send_concurrency="1", send_batch="4")
    try:
        a.start(), b.start()
        yield a, b
    finally:
        for node in (a, b):
            node.stop()


@pytest.fixture
def logs(sites):
    """The nodes' server logs in the report of a failing test."""
    yield
    for node in sites:
        lines = [x for x in node.tail(3000).splitlines() if '"GET /' not in x and "mail.log" not in x]
        print(f"---- node {node.name} ----\n" + "\n".join(lines[-40:]))


def _patient_and_requester(client: SyncFHIRClient) -> None:
    client.resource("Patient", id="p1", identifier=[{"system": "urn:oid:1.2.3", "value": "PID-4711"}],
                    name=[{"family": "Müller", "given": ["Jürgen"]}]).save()
    client.resource("Organization", id="klinik-a", name="Klinik A").save()


def place(client: SyncFHIRClient, performer: str | list[str], study: str | None, *options: str,
          priority: str = "routine", note: str | None = None, profile: bool = True, supporting: list | None = None):
    """A teleconsult ServiceRequest saved through fhirpy (raises OperationOutcome when refused)."""
    _patient_and_requester(client)
    sr = client.resource(
        "ServiceRequest", status="active", intent="order", priority=priority,
        code={"coding": [{"system": f"{BASE}/CodeSystem/consult-kind", "code": "teleconsult"}]},
        orderDetail=[{"coding": [{"system": SEND_OPTION, "code": o}]} for o in options],
        subject={"reference": "Patient/p1"}, requester={"reference": "Organization/klinik-a"},
        performer=[{"reference": p} for p in ([performer] if isinstance(performer, str) else performer)],
        supportingInfo=supporting or [{"reference": f"ImagingStudy/{study}"}],
        **({"meta": {"profile": [f"{SD}/teleconsult-servicerequest"]}} if profile else {}),
        **({"note": [{"text": note}]} if note is not None else {}))
    sr.save()
    return sr


def order_tasks(client: SyncFHIRClient, sr_id: str) -> list:
    return [t for t in client.resources("Task").search(based_on=f"ServiceRequest/{sr_id}").fetch_all()
            if f"{SD}/teleconsult-task" in t["meta"]["profile"]]


def consult_of(client_b: SyncFHIRClient, a: Node, sr_id: str, timeout: float = 120.0):
    """(ServiceRequest, Task) of the consult that A's order ``sr_id`` became at B."""
    def found():
        srs = client_b.resources("ServiceRequest").search(identifier=f"{ORDER_SYSTEM}|{sr_id}@{a.address}") \
            .fetch_all()
        if not srs:
            return None
        tasks = client_b.resources("Task").search(based_on=f"ServiceRequest/{srs[0].id}").fetch_all()
        return (srs[0], tasks[0]) if tasks else None
    return wait_for(found, timeout, interval=0.2, what=f"the consult of ServiceRequest/{sr_id} at B")


def study_of(sr) -> str:
    return sr["supportingInfo"][0]["reference"].split("/", 1)[1]


def jobs_at(node: Node) -> list[dict]:
    with node.http() as h:
        r = h.get("/gateway/jobs", params={"state": "all", "limit": 200})
    assert r.status_code == 200, r.text
    return r.json()["jobs"]


def job_of(node: Node, study: str) -> dict | None:
    return next((j for j in jobs_at(node) if j["study"] == study and j.get("kind") != "message"), None)


def set_of(node: Node, study: str) -> dict | None:
    return next((s for s in _sets(node) if s["study"] == study), None)


def imported(node: Node, study: str, timeout: float = 120.0) -> dict:
    return wait_for(lambda: (s := set_of(node, study)) is not None and s["state"] == "imported" and s, timeout,
                    interval=0.1, what=f"the set of study {study} imported at {node.name}")


def images(n: int, *, study: str | None = None, series: str | None = None, size: int = 16) -> tuple[str, list[bytes]]:
    study, series = study or generate_uid(), series or generate_uid()
    return study, [make_instance(study=study, series=series, instance_number=i, patient_name="Müller^Jürgen",
                                 patient_id="PID-4711", accession="ACC-4711", size=size) for i in range(1, n + 1)]


def sop_of(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


# ---- 1. emergency overtakes a bulk transfer -----------------------------------------------------------------
def test_an_emergency_order_overtakes_a_running_bulk_transfer(sites, logs):
    a, b = sites
    ehr_a, ehr_b = ehr(a), ehr(b)
    bulk_study, bulk = images(150, size=8)
    _stow(a, bulk)
    stat_study, stat = images(2)
    _stow(a, stat)

    bulk_sr = place(ehr_a, service_of(b), bulk_study)
    running = wait_for(lambda: (j := job_of(a, bulk_study)) and j["state"] == "active" and 1 <= j["sent"]
                       and j["acknowledged"] < j["images"] and j, 60, interval=0.05, what="the bulk transfer running")
    assert running["images"] == 150 and running["priority"] == "routine"

    note = "NOTFALL: V.a. Aortendissektion, bitte sofort befunden"
    stat_sr = place(ehr_a, service_of(b), stat_study, "short-note", priority="stat", note=note)
    assert job_of(a, stat_study)["emergency"] is True
    stat_set = imported(b, stat_study, 60)
    bulk_set = set_of(b, bulk_study)  # read right after: the bulk set is still arriving
    assert bulk_set is None or bulk_set["received"] < bulk_set["total"] == 150, bulk_set
    assert bulk_set is None or bulk_set["state"] != "imported"
    assert stat_set["total"] == stat_set["received"] == 2
    assert job_of(a, bulk_study)["acknowledged"] < 150

    sr_b, task_b = consult_of(ehr_b, a, stat_sr.id)  # an emergency consult at B, with the note
    assert sr_b["priority"] == "stat" and task_b["priority"] == "stat"
    assert [n["text"] for n in sr_b["note"]] == [note]
    assert "NOTFALL" in [n["text"] for n in task_b.get("note", [])]
    assert study_of(sr_b) == stat_study and task_b["status"] == "requested"
    assert sorted(_instances_at(b, stat_study)) == sorted(sop_of(d) for d in stat)

    # the bulk transfer still completes: every instance once, and its consult is routine
    wait_for(lambda: job_of(a, bulk_study)["state"] in ("finished", "failed"), 240, interval=0.5,
             what="the bulk transfer finished")
    assert job_of(a, bulk_study)["state"] == "finished"
    done = imported(b, bulk_study, 60)
    assert done["received"] == done["total"] == 150
    sr_bulk_b, task_bulk_b = consult_of(ehr_b, a, bulk_sr.id)
    assert sr_bulk_b["priority"] == task_bulk_b["priority"] == "routine" and "note" not in task_bulk_b
    [order] = order_tasks(ehr_a, stat_sr.id)
    assert order["priority"] == "stat"


# ---- 2. anonymised, attribute by attribute ------------------------------------------------------------------
def test_the_profile_table_is_the_standards():
    rows = {e["tag"]: e["basic"] for e in PROFILE["attributes"]}
    assert {t: rows.get(t) for t in STANDARD_SPOT_CHECKS} == STANDARD_SPOT_CHECKS
    assert len(ROWS) >= 600  # nearly every row of Table E.1-1 is filled by the test data


def _profile_study(n: int = 3) -> tuple[str, list[bytes]]:
    """``n`` instances in two series, every Table E.1-1 row filled, each referencing the next instance."""
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    sops = [generate_uid() for _ in range(n)]
    shared: dict[str, str] = {}
    return study, [profile_instance(study=study, series=series[i * 2 // n], sop=sops[i], number=i + 1,
                                    refers_to=sops[(i + 1) % n], shared=shared, series_number=1 + i * 2 // n)
                   for i in range(n)]


def _anonymised_at_b(a: Node, b: Node, study: str, *options: str) -> tuple[str, list[bytes], object]:
    """Order ``study`` anonymised to B; (B's study UID, the instances B stored, B's ServiceRequest)."""
    sr = place(ehr(a), service_of(b), study, "anonymised", *options)
    sr_b, _ = consult_of(ehr(b), a, sr.id)
    pseudo = study_of(sr_b)
    assert pseudo != study and pseudo.startswith("2.25.")
    return pseudo, list(_instances_at(b, pseudo).values()), sr_b


def test_the_anonymised_study_at_b_follows_the_basic_profile_row_by_row(sites, logs):
    a, b = sites
    study, originals = _profile_study(3)
    _stow(a, originals)
    pseudo, received, sr_b = _anonymised_at_b(a, b, study)
    assert len(received) == 3

    verdict = check_instances(originals, received)
    assert verdict.problems == [], "\n".join(verdict.problems[:50])
    assert verdict.counts.get("K", 0) == verdict.counts.get("C", 0) == 0  # no option: no K, no C
    assert sum(verdict.counts.values()) >= 3 * 600

    got = [dcmread(io.BytesIO(d)) for d in received]
    assert {ds.StudyInstanceUID for ds in got} == {pseudo}
    by_number = {int(ds.InstanceNumber): ds for ds in got}
    assert len({ds.SeriesInstanceUID for ds in got}) == 2
    assert by_number[1].SeriesInstanceUID == by_number[2].SeriesInstanceUID != by_number[3].SeriesInstanceUID
    for n, ds in by_number.items():  # references point at the new UID of the instance they name
        target = by_number[n % 3 + 1].SOPInstanceUID
        assert ds.ReferencedSOPInstanceUID == target
        for seq in ("ReferencedImageSequence", "SourceImageSequence"):
            if seq in ds and len(ds[seq].value):
                assert ds[seq][0].ReferencedSOPInstanceUID == target, seq
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]
        assert str(ds.PatientName).startswith("PSEUDONYM^") and ds.PatientID.startswith("PSN-")
        assert "OtherPatientIDsSequence" not in ds and "OtherPatientIDs" not in ds
    assert len({ds.PatientID for ds in got}) == 1 and len({str(ds.PatientName) for ds in got}) == 1

    raw = b"".join(received)
    assert [s for s in IDENTITY if s.encode() in raw] == []
    assert [u for u in original_uids(originals) if u.encode() in raw] == []
    with b.http() as h:  # nothing identifying in what B's EHR and QIDO see either
        meta = h.get(f"/dicomweb/studies/{pseudo}/metadata").text
        assert [s for s in IDENTITY if s in meta] == []
    assert [s for s in IDENTITY if s in str(sr_b.serialize())] == []
    # the set headers (X-TELEMEDICINE-STUDYID travels outside the encryption) name the new Study UID only
    assert set_of(b, study) is None and imported(b, pseudo)["total"] == 3


def test_clean_descriptors_and_modified_dates_shift_dates_and_keep_cleaned_descriptions(sites, logs):
    a, b = sites
    study, originals = _profile_study(2)
    _stow(a, originals)
    _, received, _ = _anonymised_at_b(a, b, study, "clean-descriptors", "retain-longitudinal-modified-dates")
    assert len(received) == 2
    got = [dcmread(io.BytesIO(d)) for d in received]
    shift = (_date(got[0].StudyDate) - _date("20240115")).days  # one shift for every date of the transfer
    assert -395 <= shift <= -30
    verdict = check_instances(originals, received, ("retain_longitudinal_modified_dates", "clean_descriptors"),
                              shift)
    assert verdict.problems == [], "\n".join(verdict.problems[:50])
    assert verdict.counts["C"] >= 2 * 250
    for ds in got:
        assert ds.StudyDescription == "Befund *** *** ***" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105"]
        assert not ds.get("PatientBirthDate")
    raw = b"".join(received)
    assert [s for s in IDENTITY if s.encode() in raw] == []
    assert [u for u in original_uids(originals) if u.encode() in raw] == []


def test_an_anonymised_order_leaves_no_identity_in_the_structured_content(sites, logs):
    a, b = sites
    study, imgs = images(2)
    report = dcmread(io.BytesIO(_sr_report(study)))
    for item in _walk(report):
        if "TextValue" in item:
            item.TextValue = f"{item.TextValue} Herr Müller Jürgen, PID-4711"
    buf = io.BytesIO()
    report.save_as(buf, enforce_file_format=True)
    series = str(dcmread(io.BytesIO(imgs[0]), stop_before_pixels=True).SeriesInstanceUID)
    kos = build_kos(study=study, evidence={study: {series: [(CTImageStorage, sop_of(imgs[0]))]}},
                    content=[("IMAGE", CTImageStorage, sop_of(imgs[0]), ())],
                    description="Schlüsselbild für Herrn Müller Jürgen")
    _stow(a, [*imgs, buf.getvalue(), kos])
    _, received, _ = _anonymised_at_b(a, b, study)
    assert len(received) == 4
    leaks = {str(ds.Modality): [t for t in (i.TextValue for i in _walk(ds) if "TextValue" in i) if "Müller" in t]
             for ds in (dcmread(io.BytesIO(d)) for d in received)}
    assert not any(leaks.values()), leaks
    assert [s for s in IDENTITY if s.encode() in b"".join(received)] == []


def _walk(ds):
    """``ds`` and every item of its sequences, depth first."""
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _date(value: str):
    import datetime as dt
    return dt.datetime.strptime(value[:8], "%Y%m%d").date()


# ---- 3. combinations ----------------------------------------------------------------------------------------
def _key_image_study() -> tuple[str, list[bytes], bytes, list[bytes]]:
    """(study, 4 images, a KOS selecting images 2 and 3, [the two selected images])."""
    study, imgs = images(4)
    series = str(dcmread(io.BytesIO(imgs[0]), stop_before_pixels=True).SeriesInstanceUID)
    chosen = imgs[1:3]
    kos = build_kos(study=study, evidence={study: {series: [(CTImageStorage, sop_of(d)) for d in chosen]}},
                    content=[("IMAGE", CTImageStorage, sop_of(d), ()) for d in chosen])
    return study, imgs, kos, chosen


def _sr_report(study: str) -> bytes:
    """pydicom's Comprehensive SR sample moved into ``study`` (own series and instance, the study's patient)."""
    ds = dcmread(sample_path("test-SR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "Müller^Jürgen", "PID-4711"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_key_images_only_with_report_sends_the_kos_its_images_and_the_reports(sites, logs):
    a, b = sites
    study, imgs, kos, chosen = _key_image_study()
    pdf = encapsulated_pdf(PDF, study=study_context_from(imgs[0]), title="Vorbefund", sop_uid=generate_uid())
    report = _sr_report(study)
    _stow(a, [*imgs, kos, pdf, report])
    sr = place(ehr(a), service_of(b), study, "key-images-only", "with-report")
    consult_of(ehr(b), a, sr.id)
    at_b = _instances_at(b, study)
    expected = {sop_of(d): d for d in (kos, *chosen, pdf, report)}
    assert sorted(at_b) == sorted(expected)  # exactly the KOS, the 2 key images and the 2 reports
    assert at_b == expected  # byte-exact (not anonymised)
    assert imported(b, study)["total"] == 5


def test_key_images_only_anonymised_the_kos_points_at_the_new_uids(sites, logs):
    a, b = sites
    study, imgs, kos, chosen = _key_image_study()
    _stow(a, [*imgs, kos])
    pseudo, received, _ = _anonymised_at_b(a, b, study, "key-images-only")
    assert len(received) == 3
    parsed = [dcmread(io.BytesIO(d)) for d in received]
    [new_kos] = [d for d, ds in zip(received, parsed) if ds.Modality == "KO"]
    new_images = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in parsed if ds.Modality == "CT"}
    assert len(new_images) == 2 and not set(new_images) & {sop_of(d) for d in imgs}
    refs = key_object_references(new_kos)  # the KOS as B reads it
    assert {r.sop_uid for r in refs.references} == set(new_images)
    assert {r.series_uid for r in refs.references} == set(new_images.values())
    assert {r.study_uid for r in refs.references} == {pseudo}
    content = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for item in dcmread(io.BytesIO(new_kos)).ContentSequence if "ReferencedSOPSequence" in item]
    assert sorted(content) == sorted(new_images)


def test_a_note_of_1000_characters_arrives_unchanged(sites, logs):
    """The limit counts characters, not bytes (umlauts are two in UTF-8); line breaks survive the text part."""
    a, b = sites
    study, imgs = images(1)
    _stow(a, imgs)
    note = ("Zeile 1: Verdacht auf Lungenembolie.\nZeile 2: Bitte Rückruf über Dienst-Telefon 1234. " * 20)
    note = (note + "ä" * 1000)[:1000]
    assert len(note) == 1000 and len(note.encode("utf-8")) > 1000
    sr = place(ehr(a), service_of(b), study, "short-note", note=note)
    sr_b, _ = consult_of(ehr(b), a, sr.id)
    assert [n["text"] for n in sr_b["note"]] == [note]


# ---- 4. bad orders and waiting orders -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def directory(sites):
    """A's directory gains: an old site on DRG profile 1.5, a site whose Endpoint has no key, one whose key is
    unusable; another tenant on A's node holds a study. Returns {name: value}."""
    a, b = sites
    client = ehr(a)
    key_text = b.public_key()
    fingerprint = import_public_key(key_text.encode("ascii")).fingerprint

    def site(name: str, extensions: list[dict]) -> str:
        client.resource("Organization", id=name, name=f"Klinik {name}", active=True).save()
        client.resource(
            "Endpoint", id=f"{name}-dicom-email", status="active", name=f"DICOM E-Mail {name}",
            meta={"profile": [f"{SD}/dicom-email-endpoint"]},
            connectionType={"system": f"{BASE}/CodeSystem/endpoint-connection-type", "code": "dicom-email"},
            payloadType=[{"text": "DICOM"}], managingOrganization={"reference": f"Organization/{name}"},
            address=f"mailto:dicom@{name}.example", extension=extensions).save()
        client.resource("HealthcareService", id=f"{name}-teleradiology", name=f"Teleradiologie {name}",
                        providedBy={"reference": f"Organization/{name}"},
                        endpoint=[{"reference": f"Endpoint/{name}-dicom-email"}]).save()
        return f"HealthcareService/{name}-teleradiology"

    def ext(key: str, fpr: str, version: str = "1.7") -> list[dict]:
        return [{"url": f"{SD}/openpgp-public-key", "valueString": key},
                {"url": f"{SD}/openpgp-fingerprint", "valueString": fpr},
                {"url": f"{SD}/drg-profile-version", "valueCode": version}]

    # The directory refuses an Endpoint without a key (profile dicom-email-endpoint, key 1..1, also without a
    # profile claim): "no key" is a key that is none, an expired one, or one its fingerprint does not name.
    expired = generate_key("Abgelaufen <dicom@expired.example>", bits=2048, created=int(time.time()) - 7200,
                           expires_in=3600).public()
    expired_text = export_public_key(expired).decode("ascii")
    out = {"old": site("old", ext(key_text, fingerprint, "1.5")),
           "nokey": site("nokey", ext("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n-----END PGP PUBLIC KEY BLOCK-----\n",
                                      "0" * 40)),
           "expired": site("expired", ext(expired_text, expired.fingerprint)),
           "badkey": site("badkey", ext(key_text, "0" * 40))}  # the fingerprint names another key
    # a study of another tenant on A's node
    other = telerad("token", "--data-dir", str(a.data), "--tenant", "site-x", env=a._env()).strip()
    study, foreign = images(1)
    body, ctype = multipart(foreign)
    r = requests.post(f"{a.url}/dicomweb/studies", data=body, timeout=60,
                      headers={"Content-Type": ctype, "Authorization": f"Bearer {other}"})
    assert r.status_code == 200, r.text
    out["foreign"] = study
    study, own = images(2)
    _stow(a, own)
    out["study"] = study
    out["b"] = service_of(b)
    return out


#: case -> (what the order changes, a word of the OperationOutcome's diagnostics)
BAD_ORDERS = {
    "unknown-recipient": (lambda d: dict(performer="HealthcareService/does-not-exist"), "does not exist"),
    "recipient-key-is-no-key": (lambda d: dict(performer=d["nokey"]), "invalid OpenPGP public key"),
    "recipient-key-expired": (lambda d: dict(performer=d["expired"]), "expired"),
    "recipient-key-not-its-fingerprint": (lambda d: dict(performer=d["badkey"]), "does not match"),
    "one-of-two-recipients-unknown": (lambda d: dict(performer=[d["b"], "HealthcareService/does-not-exist"]),
                                      "does not exist"),
    "study-of-another-tenant": (lambda d: dict(study=d["foreign"]), "does not exist"),
    "study-not-in-the-archive": (lambda d: dict(study=generate_uid()), "does not exist"),
    "note-over-1000-characters": (lambda d: dict(note="x" * 1001), "1001 characters"),
    "short-note-to-drg-1.5": (lambda d: dict(performer=d["old"], options=("short-note",), note="kurz"),
                              "DRG profile 1.5"),
    "key-images-without-kos": (lambda d: dict(options=("key-images-only",)), "Key Object Selection"),
    "short-note-without-note": (lambda d: dict(options=("short-note",)), "needs a note"),
    "option-code-unknown": (lambda d: dict(options=("teleport",)), "send-option"),
    "option-code-misspelt": (lambda d: dict(options=("anonymized",)), "send-option"),  # would send identity
    "refinement-without-anonymised": (lambda d: dict(options=("clean-descriptors",)), "refines anonymised"),
    "both-longitudinal-options": (lambda d: dict(options=("anonymised", "retain-longitudinal-full-dates",
                                                          "retain-longitudinal-modified-dates")), "exclude each other"),
}


def _client_recording(node: Node, statuses: list[int]) -> SyncFHIRClient:
    """fhirpy as the EHR, recording the HTTP status of every answer (fhirpy raises without it)."""
    return SyncFHIRClient(f"{node.url}/fhir", authorization=f"Bearer {node.token}",
                          requests_config={"hooks": {"response": [lambda r, *a, **k: statuses.append(r.status_code)]},
                                           "timeout": 60})


def _count(client: SyncFHIRClient, rtype: str) -> int:
    return client.resources(rtype).search(_count="0").count()


@pytest.mark.parametrize("case", list(BAD_ORDERS))
def test_a_bad_order_gets_an_operation_outcome_and_nothing_is_sent(sites, directory, case):
    a, b = sites
    change, reason = BAD_ORDERS[case]
    spec = change(directory)
    statuses: list[int] = []
    client = _client_recording(a, statuses)
    _patient_and_requester(client)
    before = (len(jobs_at(a)), _count(client, "ServiceRequest"), _count(client, "Task"), len(_sets(b)))
    statuses.clear()
    with pytest.raises(OperationOutcome) as caught:
        place(client, spec.get("performer", service_of(b)), spec.get("study", directory["study"]),
              *spec.get("options", ()), note=spec.get("note"))
    outcome = caught.value.resource
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error" and outcome["issue"][0].get("diagnostics"), outcome
    assert statuses[-1] == 422, (statuses, outcome)
    assert reason in " ".join(i.get("diagnostics", "") for i in outcome["issue"]), outcome
    after = (len(jobs_at(a)), _count(client, "ServiceRequest"), _count(client, "Task"), len(_sets(b)))
    assert after == before


def test_an_unknown_option_code_is_refused_also_without_the_profile_claim(sites, directory):
    """An order that claims no profile is still an order (``is_order``); the R4 base binding of our send-option
    codes refuses a misspelt 'anonymized', which would otherwise send the study with the patient's identity."""
    a, b = sites
    client = ehr(a)
    before = len(jobs_at(a))
    with pytest.raises(OperationOutcome) as caught:
        place(client, service_of(b), directory["study"], "anonymized", profile=False)
    assert caught.value.resource["issue"][0]["code"] == "code-invalid"
    assert len(jobs_at(a)) == before


def test_an_order_for_a_study_not_yet_there_waits_and_then_travels(sites, directory, logs):
    a, b = sites
    client = ehr(a)
    study, later = images(2)

    def by_identifier(uid: str) -> list:
        return [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}}]
    foreign = place(client, service_of(b), None, supporting=by_identifier(directory["foreign"]))
    waiting = place(client, service_of(b), None, supporting=by_identifier(study))
    for sr in (foreign, waiting):
        [task] = order_tasks(client, sr.id)
        assert (task["status"], business(task)) == ("requested", "awaiting-study")
    assert job_of(a, study) is None and job_of(a, directory["foreign"]) is None
    _stow(a, later)  # the study arrives: the sweep starts its transfer
    consult_of(ehr(b), a, waiting.id)
    assert sorted(_instances_at(b, study)) == sorted(sop_of(d) for d in later)
    # the other tenant's study is never sent on site-a's order: it is not in site-a's archive
    [task] = order_tasks(client, foreign.id)
    assert (task["status"], business(task)) == ("requested", "awaiting-study")
    assert job_of(a, directory["foreign"]) is None and set_of(b, directory["foreign"]) is None
