"""De-identification options of a teleconsult order (issue 5, server/gateway/orders.py), in-process on SQLite and
PostgreSQL: each PS3.15 E.3 send-option code turns on its field of the job's Annex E options, the codes need
``anonymised`` (422, nothing stored), the site's defaults (TELERAD_DEID_DEFAULTS) are added to every anonymised
order, and instances with burned-in annotation give the order Task a note or, with exclude-burned-in, stay home."""

from __future__ import annotations

import io
import json

import pytest
from pydantic import ValidationError
from pydicom import dcmread

from server.config import Settings
from server.gateway.orders import sweep_waiting
from server.store import gateway as gw
from tests.component.test_gateway_api import app, keys  # noqa: F401 - fixtures
from tests.component.test_orders import (LATER, STUDY, _code, _jobs, _post, _sr, _stow, _tasks, _valid,  # noqa: F401
                                         old_key, world)
from tests.dicomdata import make_instance

A = "site-a"
BURNED = "1.2.826.0.1.12"
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (PS3.4 B.5)
DEFAULT_OPTIONS = {"clean_descriptors": False, "retain_longitudinal": "off", "date_shift_days": 0,
                   "retain_patient_characteristics": False, "retain_device_identity": False,
                   "retain_institution_identity": False, "retain_uids": False}
#: send-option code -> the fields of server.dicom.deidentify.Options it turns on (PS3.15 E.3.x)
CODES = {"clean-descriptors": {"clean_descriptors": True},
         "retain-longitudinal-full-dates": {"retain_longitudinal": "full"},
         "retain-longitudinal-modified-dates": {"retain_longitudinal": "modified"},
         "retain-patient-characteristics": {"retain_patient_characteristics": True},
         "retain-device-identity": {"retain_device_identity": True},
         "retain-institution-identity": {"retain_institution_identity": True}}


@pytest.fixture
def settings(settings, request, monkeypatch):
    """The server's settings; parametrized indirectly with a TELERAD_DEID_DEFAULTS value read from the
    environment like at start."""
    defaults = getattr(request, "param", None)
    if defaults is None:
        return settings
    monkeypatch.setenv("TELERAD_DEID_DEFAULTS", defaults)
    return Settings(data_dir=settings.data_dir, database_url=settings.database_url, gateway_worker=False)


def instance(study: str, n: int, *, sc: bool = False, **extra) -> bytes:
    """Instance ``n`` of ``study``: a CT image, or a Secondary Capture image with ``sc``."""
    data = make_instance(study=study, series=f"{study}.1", sop=f"{study}.1.{n}", instance_number=n, **extra)
    if not sc:
        return data
    ds = dcmread(io.BytesIO(data))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC
    ds.Modality = "OT"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def burned_study(study: str) -> list[bytes]:
    """An SC image without Burned In Annotation and a CT with YES (both flagged), a CT with NO, a CT without."""
    return [instance(study, 1, sc=True), instance(study, 2, BurnedInAnnotation="YES"),
            instance(study, 3, BurnedInAnnotation="NO"), instance(study, 4)]


def _deid(job: gw.Job) -> dict:
    return json.loads(job.deid_options)


def _sent(app, job: gw.Job) -> list[str]:
    return [m.sop_instance_uid for m in gw.job_mails(app.state.engine, A, job.job_id)]


def _outcome(r, where: str) -> str:
    assert r.status_code == 422, r.text
    [issue] = r.json()["issue"]
    assert issue["severity"] == "error" and issue["expression"] == [where], issue
    return issue["diagnostics"]


def test_each_option_code_turns_on_its_field(client, world, app):
    for code, fields in CODES.items():
        r = _post(client, world, _sr(options=("anonymised", code)))
        assert r.status_code == 201, (code, r.text)
        job = _jobs(app)[0]  # newest first
        assert job.options == {"anonymised", code} and len(bytes.fromhex(job.deid_secret)) == 32
        assert _deid(job) == {**DEFAULT_OPTIONS, **fields}, code
    r = _post(client, world, _sr(options=("anonymised", *CODES.keys() - {"retain-longitudinal-full-dates"})))
    assert r.status_code == 201, r.text
    assert _deid(_jobs(app)[0]) == {**DEFAULT_OPTIONS, **{k: v for c, f in CODES.items() for k, v in f.items()
                                                          if c != "retain-longitudinal-full-dates"}}
    assert len(_jobs(app)) == len(CODES) + 1
    r = _post(client, world, _sr(options=("anonymised",)))  # the plain Basic Profile
    assert r.status_code == 201 and _deid(_jobs(app)[0]) == DEFAULT_OPTIONS


@pytest.mark.parametrize("options, where, says", [
    (("clean-descriptors",), "ServiceRequest.orderDetail[0]", "clean-descriptors refines anonymised"),
    (("key-images-only", "exclude-burned-in"), "ServiceRequest.orderDetail[1]", "exclude-burned-in refines"),
    (("short-note", "retain-device-identity"), "ServiceRequest.orderDetail[1]", "retain-device-identity refines"),
    (("anonymised", "retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"),
     "ServiceRequest.orderDetail[2]", "exclude each other"),
])
def test_invalid_combinations_store_nothing(client, world, app, options, where, says):
    r = _post(client, world, _sr(options=options, note="kurz"))
    assert says in _outcome(r, where)
    assert _jobs(app) == []
    assert client.get("/fhir/Task", headers=world["a"]).json()["total"] == 0
    assert client.get("/fhir/ServiceRequest", headers=world["a"]).json()["total"] == 0


def test_two_invalid_codes_are_both_named(client, world):
    r = _post(client, world, _sr(options=("retain-uids-unknown",)))  # not in the ValueSet: the binding refuses it
    assert r.status_code == 422
    r = _post(client, world, _sr(options=("clean-descriptors", "short-note", "retain-institution-identity"),
                                 note="kurz"))
    assert r.status_code == 422
    assert [i["expression"] for i in r.json()["issue"]] == [["ServiceRequest.orderDetail[0]"],
                                                           ["ServiceRequest.orderDetail[2]"]]


@pytest.mark.parametrize("settings", ["retain-longitudinal-full-dates, clean-descriptors"], indirect=True)
def test_site_defaults_apply_to_every_anonymised_order(client, world, app):
    assert app.state.settings.deid_default_codes == {"clean-descriptors", "retain-longitudinal-full-dates"}
    r = _post(client, world, _sr(options=("anonymised", "retain-patient-characteristics")))
    assert r.status_code == 201, r.text
    job = _jobs(app)[0]
    assert _deid(job) == {**DEFAULT_OPTIONS, "clean_descriptors": True, "retain_longitudinal": "full",
                          "retain_patient_characteristics": True}
    assert job.options == {"anonymised", "retain-patient-characteristics", "clean-descriptors",
                           "retain-longitudinal-full-dates"}
    # the order's own E.3.6 choice replaces the default's
    r = _post(client, world, _sr(options=("anonymised", "retain-longitudinal-modified-dates")))
    assert r.status_code == 201, r.text
    job = _jobs(app)[0]
    assert _deid(job) == {**DEFAULT_OPTIONS, "clean_descriptors": True, "retain_longitudinal": "modified"}
    assert "retain-longitudinal-full-dates" not in job.options
    # not anonymised: the defaults do not apply
    r = _post(client, world, _sr())
    assert r.status_code == 201, r.text
    job = _jobs(app)[0]
    assert (job.deid_secret, job.deid_options, job.send_options) == (None, None, None)


@pytest.mark.parametrize("value", ["clean-descriptors,fax", "anonymised",
                                   "retain-longitudinal-full-dates,retain-longitudinal-modified-dates"])
def test_invalid_site_defaults_refuse_to_start(monkeypatch, tmp_path, value):
    monkeypatch.setenv("TELERAD_DEID_DEFAULTS", value)
    with pytest.raises(ValidationError, match="deid_defaults"):
        Settings(data_dir=tmp_path)
    monkeypatch.setenv("TELERAD_DEID_DEFAULTS", " exclude-burned-in ,retain-device-identity")
    assert Settings(data_dir=tmp_path).deid_default_codes == {"exclude-burned-in", "retain-device-identity"}
    monkeypatch.delenv("TELERAD_DEID_DEFAULTS")
    assert Settings(data_dir=tmp_path).deid_default_codes == frozenset()


def test_burned_in_annotation_notes_the_order_task(client, world, app):
    _stow(client, world["a"], burned_study(BURNED))
    r = _post(client, world, _sr(study=BURNED, options=("anonymised",)))
    assert r.status_code == 201, r.text
    [order], [_] = _tasks(client, world, r.json()["id"])
    assert [n["text"] for n in order["note"]] == [
        "Achtung: 2 von 4 Bildern haben eingebrannte Beschriftung (Burned In Annotation); die Pixeldaten werden "
        "nicht anonymisiert."]
    _valid(client, world, order)
    [job] = _jobs(app)
    assert _sent(app, job) == [f"{BURNED}.1.{i}" for i in (1, 2, 3, 4)]
    # not anonymised: the pixel data travels as it is anyway, no note
    r = _post(client, world, _sr(study=BURNED))
    [order], [_] = _tasks(client, world, r.json()["id"])
    assert "note" not in order


def test_exclude_burned_in_leaves_those_instances_at_home(client, world, app):
    _stow(client, world["a"], burned_study(BURNED))
    r = _post(client, world, _sr(study=BURNED, options=("anonymised", "exclude-burned-in", "clean-descriptors")))
    assert r.status_code == 201, r.text
    [job] = _jobs(app)
    assert _sent(app, job) == [f"{BURNED}.1.3", f"{BURNED}.1.4"] and job.total == 2
    assert job.options == {"anonymised", "exclude-burned-in", "clean-descriptors"}
    [order], [_] = _tasks(client, world, r.json()["id"])
    assert [n["text"] for n in order["note"]] == [
        "Hinweis: 2 von 4 Bildern haben eingebrannte Beschriftung (Burned In Annotation) und werden nicht gesendet."]


def test_exclude_burned_in_with_nothing_left_is_refused(client, world, app):
    _stow(client, world["a"], [instance(BURNED, 1, sc=True), instance(BURNED, 2, BurnedInAnnotation="YES")])
    r = _post(client, world, _sr(study=BURNED, options=("anonymised", "exclude-burned-in")))
    assert "nothing is left to send" in _outcome(r, "ServiceRequest.orderDetail")
    assert _jobs(app) == [] and client.get("/fhir/ServiceRequest", headers=world["a"]).json()["total"] == 0


@pytest.mark.parametrize("settings", ["exclude-burned-in"], indirect=True)
def test_a_waiting_order_checks_burned_in_annotation_when_its_study_arrives(client, world, app):
    excluded = _post(client, world, _sr(study=LATER, literal=False, options=("anonymised",)))  # site default
    plain = _post(client, world, _sr(study=LATER, literal=False))
    assert excluded.status_code == plain.status_code == 201
    _stow(client, world["a"], [instance(LATER, 1, BurnedInAnnotation="YES"), instance(LATER, 2)])
    assert sweep_waiting(app.state.fhir) == 2
    [order], [_] = _tasks(client, world, excluded.json()["id"])
    assert _code(order) == ("requested", "transfer-queued")
    assert [n["text"] for n in order["note"]] == [
        "Hinweis: 1 von 2 Bildern hat eingebrannte Beschriftung (Burned In Annotation) und wird nicht gesendet."]
    _valid(client, world, order)
    by_order = {j.order_ref: j for j in _jobs(app)}
    assert _sent(app, by_order[f"ServiceRequest/{excluded.json()['id']}"]) == [f"{LATER}.1.2"]
    assert _sent(app, by_order[f"ServiceRequest/{plain.json()['id']}"]) == [f"{LATER}.1.1", f"{LATER}.1.2"]
    [order], [_] = _tasks(client, world, plain.json()["id"])
    assert "note" not in order
