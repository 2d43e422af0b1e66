"""QIDO-RS SQL (server/store/index.py) on a real SQLite file and on PostgreSQL (``database_url`` fixture).

Rows are inserted by hand: the columns as the STOW writer fills them, ``attrs``/``meta`` built with pydicom's
``Dataset.to_json_dict`` from small synthetic data sets.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field

import pytest
from pydicom import Dataset
from sqlmodel import Session

from server.dicom.attributes import Level
from server.dicom.names import normalize_pn, phonetic_key
from server.dicomweb.qido import parse_query, render
from server.store import index
from server.store.db import create_schema, make_engine
from server.store.models import Instance, Series, Study

S, SE, I = Level.STUDY, Level.SERIES, Level.INSTANCE
CT, SR, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.4"
ELE, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"
BASE = "https://pacs.example/dicomweb"


@dataclass
class Inst:
    number: int | None
    sop_class: str = CT
    ts: str = ELE
    time: str | None = "083000.000000"
    rows: int = 512


@dataclass
class Ser:
    modality: str
    number: int | None
    instances: list[Inst] = field(default_factory=lambda: [Inst(1)])
    description: str = "Series"


@dataclass
class Stu:
    key: str
    name: str
    pid: str
    date: str | None
    time: str | None
    description: str | None
    series: list[Ser]
    referring: str | None = "Dr^Who"


UID = "1.2.826.0.1.3680043.10.99"


def uid(key: str, *parts: int) -> str:
    return ".".join([UID, key.lstrip("S"), *map(str, parts)])


STUDIES = [
    Stu("S1", "Müller^Jürgen", "PID-1", "20200115", "083000.000000", "Dose 50% reduced",
        [Ser("CT", 1, [Inst(2), Inst(1, time="101500.250000")]), Ser("SR", 2, [Inst(1, SR)])]),
    Stu("S2", "Mueller^Hans", "PID-2", "20200131", "120000.000000", "Dose 500 mg",
        [Ser("MR", 1, [Inst(None, MR, JPEG), Inst(1, MR)])], referring="Meyer^Paul"),
    Stu("S3", "MÜLLER", "pid-3", "20191231", None, "Knee_left", [Ser("US", 1)]),
    Stu("S4", "Meyer^Anna", "PID-4", "20210101", "235900.000000", "KneeXleft",
        [Ser("CT", None), Ser("CT", 2, [Inst(1, rows=256)])]),
    Stu("S5", "Maier^Karl", "PID-5", None, None, None, [Ser("DX", 1)]),
    Stu("S6", "Meier^Otto", "PID-6", "20200115", "090000.000000", "[bracket] study", [Ser("MR", 1)]),
    Stu("S7", "Schmidt^Eva", "PID-7", "20200115", "090000.000000", "Dose 50%", [Ser("CT", 1)]),
]
# newest first: date DESC, time DESC, id DESC (S7 was inserted after S6); no date last
STUDY_ORDER = ["S4", "S2", "S7", "S6", "S1", "S3", "S5"]


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        if v is not None:
            setattr(ds, k, v)
    return ds


def _json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict())


def insert(session: Session, tenant: str, studies: list[Stu]) -> None:
    """Rows as the STOW writer would store them."""
    for st in studies:
        study_uid = uid(st.key)
        study_ds = _ds(PatientName=st.name, PatientID=st.pid, StudyDate=st.date, StudyTime=st.time,
                       StudyDescription=st.description, StudyInstanceUID=study_uid, AccessionNumber="A" + st.key,
                       ReferringPhysicianName=st.referring, PatientSex="O", StudyID=st.key)
        n_inst = sum(len(se.instances) for se in st.series)
        study = Study(
            tenant=tenant, study_uid=study_uid, patient_name=st.name, patient_name_norm=normalize_pn(st.name),
            patient_name_phonetic=phonetic_key(st.name), patient_id=st.pid, patient_sex="O",
            study_date=st.date, study_time=st.time, accession_number="A" + st.key,
            modalities_in_study="\\".join(sorted({se.modality for se in st.series})),
            referring_physician_name=st.referring,
            referring_physician_name_norm=normalize_pn(st.referring) if st.referring else None,
            referring_physician_name_phonetic=phonetic_key(st.referring) if st.referring else None,
            study_description=st.description, study_id=st.key, number_of_series=len(st.series),
            number_of_instances=n_inst, attrs=_json(study_ds),
        )
        session.add(study)
        session.flush()
        for si, se in enumerate(st.series, start=1):
            series_uid = uid(st.key, si)
            series_ds = _ds(SeriesInstanceUID=series_uid, Modality=se.modality, SeriesNumber=se.number,
                            SeriesDescription=se.description)
            series = Series(
                tenant=tenant, study_pk=study.id, study_uid=study_uid, series_uid=series_uid, modality=se.modality,
                series_number=se.number, series_description=se.description, number_of_instances=len(se.instances),
                transfer_syntaxes="\\".join(sorted({i.ts for i in se.instances})), attrs=_json(series_ds),
            )
            session.add(series)
            session.flush()
            for ii, inst in enumerate(se.instances, start=1):
                sop_uid = uid(st.key, si, ii)
                inst_ds = _ds(SOPInstanceUID=sop_uid, SOPClassUID=inst.sop_class, InstanceNumber=inst.number,
                              Rows=inst.rows, Columns=inst.rows, ContentDate=st.date, ContentTime=inst.time)
                meta = Dataset()
                for part in (study_ds, series_ds, inst_ds):
                    meta.update(part)
                meta.PatientAge = "045Y"
                meta.OperatorsName = f"Operator^{st.key}^{si}^{ii}"
                meta_json = meta.to_json_dict()
                bulk = f"\x01/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulk/7FE00010"
                meta_json["7FE00010"] = {"vr": "OW", "BulkDataURI": bulk}
                session.add(Instance(
                    tenant=tenant, study_pk=study.id, series_pk=series.id, study_uid=study_uid,
                    series_uid=series_uid, sop_uid=sop_uid, sop_class_uid=inst.sop_class,
                    instance_number=inst.number, content_date=st.date, content_time=inst.time,
                    acquisition_datetime=(st.date + inst.time) if st.date and inst.time else None,
                    rows=inst.rows, columns=inst.rows, bits_allocated=16, number_of_frames=1,
                    transfer_syntax_uid=inst.ts, blob="0" * 64, size=1000, attrs=_json(inst_ds),
                    meta=json.dumps(meta_json), bulk="{}",
                ))
    session.commit()


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine):
    with Session(engine) as session:
        insert(session, "A", STUDIES)
        # tenant B holds a study with the very same UIDs and patient as tenant A's S1
        insert(session, "B", [Stu("S1", "Müller^Jürgen", "PID-1", "20200115", "083000.000000", "B's copy",
                                  [Ser("CT", 1)])])
    with Session(engine) as session:
        yield session


def find(session, level, params=(), *, tenant="A", study=None, series=None, limit=None):
    params = list(params.items()) if isinstance(params, dict) else list(params)
    if limit is not None:
        params.append(("limit", str(limit)))
    query, _ = parse_query(level, params, study_uid=study, series_uid=series, default_limit=100, max_limit=1000)
    page = index.search(session, tenant, query)
    return page, render(page.rows, query, BASE)


def keys(session, level, params=(), **kw) -> list[str]:
    """Result keys: 'S1' for studies, 'S1.2' for series, 'S1.2.1' for instances, in result order."""
    page, _ = find(session, level, params, **kw)
    out = []
    for r in page.rows:
        u = {S: r.study_uid, SE: r.series_uid, I: r.sop_uid}[level]
        out.append("S" + u[len(UID) + 1:])
    return out


def sset(session, level, params=(), **kw) -> set[str]:
    return set(keys(session, level, params, **kw))


# ---- study level: every matching rule ------------------------------------------------------------

@pytest.mark.parametrize("params,expected", [
    ({}, STUDY_ORDER),
    ({"PatientID": "PID-1"}, ["S1"]),
    ({"00100020": "PID-3"}, []),  # TEXT is case-sensitive
    ({"PatientID": "pid-3"}, ["S3"]),
    ({"PatientID": "PID-*"}, ["S4", "S2", "S7", "S6", "S1", "S5"]),
    ({"PatientID": "pid*"}, ["S3"]),
    ({"PatientID": "PID-?"}, ["S4", "S2", "S7", "S6", "S1", "S5"]),
    ({"PatientID": "PID-1?"}, []),
    ({"StudyDescription": "*50%*"}, ["S7", "S1"]),  # % is literal, does not match "500"
    ({"StudyDescription": "Dose 50%"}, ["S7"]),
    ({"StudyDescription": "Knee_left"}, ["S3"]),  # _ is literal, "KneeXleft" does not match
    ({"StudyDescription": "Knee_*"}, ["S3"]),
    ({"StudyDescription": "Knee?left"}, ["S4", "S3"]),
    ({"StudyDescription": "[bracket]*"}, ["S6"]),
    ({"StudyDescription": "dose*"}, []),
    ({"StudyDescription": ""}, STUDY_ORDER),  # universal, includes S5 without a description
    ({"AccessionNumber": "AS2"}, ["S2"]),
    ({"StudyID": "S*"}, STUDY_ORDER),
    ({"PatientSex": "O"}, STUDY_ORDER),
    ({"StudyInstanceUID": uid("S2")}, ["S2"]),
    ({"0020000D": f"{uid('S1')},{uid('S2')}"}, ["S2", "S1"]),
    ({"StudyInstanceUID": f"{uid('S3')}\\{uid('S5')}\\1.2.3"}, ["S3", "S5"]),
    ({"ModalitiesInStudy": "MR"}, ["S2", "S6"]),
    ({"ModalitiesInStudy": "CT,US"}, ["S4", "S7", "S1", "S3"]),
    ({"ModalitiesInStudy": "SR"}, ["S1"]),
    ({"ModalitiesInStudy": "C"}, []),
    ({"ModalitiesInStudy": "C*"}, ["S4", "S7", "S1"]),
    ({"StudyDate": "20200115"}, ["S7", "S6", "S1"]),
    ({"StudyDate": "20200101-20200131"}, ["S2", "S7", "S6", "S1"]),
    ({"StudyDate": "-20200101"}, ["S3"]),
    ({"StudyDate": "20210101-"}, ["S4"]),
    ({"StudyTime": "0800-0900"}, ["S7", "S6", "S1"]),
    ({"StudyTime": "1200"}, ["S2"]),
    ({"StudyTime": "2300-0100"}, ["S4"]),
    ({"StudyTime": "-0830"}, ["S1"]),
    ({"StudyDate": "20200115", "StudyTime": "0900-"}, ["S7", "S6"]),
    ({"NumberOfStudyRelatedSeries": "2"}, ["S4", "S1"]),
    ({"NumberOfStudyRelatedInstances": "3"}, ["S1"]),
])
def test_study_matching(db, params, expected):
    assert keys(db, S, params) == expected


@pytest.mark.parametrize("params,expected", [
    ({"PatientName": "müller"}, {"S3"}),  # lower case finds upper case
    ({"PatientName": "MUELLER"}, {"S3"}),  # the folded form finds the umlaut
    ({"PatientName": "Müller^Jürgen"}, {"S1"}),
    ({"PatientName": "mueller^juergen"}, {"S1"}),
    ({"PatientName": "mueller*"}, {"S1", "S2", "S3"}),  # 'mueller' finds 'Müller'
    ({"PatientName": "MÜLL*"}, {"S1", "S2", "S3"}),
    ({"PatientName": "m?ier*"}, {"S5", "S6"}),
    ({"PatientName": "*^anna"}, {"S4"}),
    ({"PatientName": "Meier"}, set()),
    ({"PatientName": "Meier^Otto"}, {"S6"}),
    ({"PatientName": ""}, set(STUDY_ORDER)),
    ({"ReferringPhysicianName": "meyer*"}, {"S2"}),
])
def test_person_name_matching(db, params, expected):
    assert sset(db, S, params) == expected


@pytest.mark.parametrize("params,expected", [
    ({"PatientName": "Meier"}, {"S4", "S5", "S6"}),  # Meyer, Maier, Meier
    ({"PatientName": "Meyer^Otto"}, {"S6"}),
    ({"PatientName": "Miller"}, {"S1", "S2", "S3"}),
    ({"PatientName": "Schmitt"}, {"S7"}),
    ({"PatientName": "Meier^Ot*"}, {"S4", "S5", "S6"}),  # the wildcard word is not phonetic
    ({"ReferringPhysicianName": "Maier"}, {"S2"}),
    ({"PatientName": "Meier^Otto"}, {"S6"}),
])
def test_fuzzy_matching(db, params, expected):
    assert sset(db, S, [*params.items(), ("fuzzymatching", "true")]) == expected


# ---- series and instance levels, hierarchical routes ----------------------------------------

@pytest.mark.parametrize("route,params,expected", [
    ((None, None), {}, None),
    (("S1", None), {}, ["S1.1", "S1.2"]),
    (("S4", None), {}, ["S4.2", "S4.1"]),  # SeriesNumber 2 before no number
    (("S4", None), {"Modality": "CT"}, ["S4.2", "S4.1"]),
    (("S1", None), {"Modality": "CT"}, ["S1.1"]),
    ((None, None), {"Modality": "CT"}, ["S1.1", "S4.2", "S4.1", "S7.1"]),
    ((None, None), {"Modality": "ct"}, []),
    ((None, None), {"Modality": "C?"}, ["S1.1", "S4.2", "S4.1", "S7.1"]),
    ((None, None), {"SeriesNumber": "2"}, ["S1.2", "S4.2"]),
    ((None, None), {"SeriesInstanceUID": f"{uid('S2', 1)},{uid('S3', 1)}"}, ["S2.1", "S3.1"]),
    ((None, None), {"NumberOfSeriesRelatedInstances": "2"}, ["S1.1", "S2.1"]),
    ((None, None), {"SeriesDescription": "Ser*"}, None),
    ((None, None), {"PatientID": "PID-1"}, ["S1.1", "S1.2"]),  # study attribute through the parent
    ((None, None), {"StudyDate": "20200115", "Modality": "MR"}, ["S6.1"]),
    ((None, None), {"PatientName": "mueller*", "Modality": "MR"}, ["S2.1"]),
    ((None, None), {"PatientName": "Meier", "fuzzymatching": "true", "Modality": "CT"}, ["S4.2", "S4.1"]),
    ((None, None), {"ModalitiesInStudy": "SR"}, ["S1.1", "S1.2"]),
    (("S1", None), {"StudyInstanceUID": uid("S2")}, []),
    (("9.9", None), {}, []),
])
def test_series_matching(db, route, params, expected):
    got = keys(db, SE, params, study=uid(route[0]) if route[0] and route[0].startswith("S") else route[0])
    if expected is None:
        expected = ["S1.1", "S1.2", "S2.1", "S3.1", "S4.2", "S4.1", "S5.1", "S6.1", "S7.1"]
    assert got == expected


@pytest.mark.parametrize("route,params,expected", [
    (("S1", "S1.1"), {}, ["S1.1.2", "S1.1.1"]),  # InstanceNumber 1 then 2
    (("S2", "S2.1"), {}, ["S2.1.2", "S2.1.1"]),  # no InstanceNumber last
    (("S1", None), {}, ["S1.1.2", "S1.1.1", "S1.2.1"]),
    (("S1", None), {"SOPClassUID": SR}, ["S1.2.1"]),
    (("S1", None), {"SOPInstanceUID": uid("S1", 1, 1)}, ["S1.1.1"]),
    (("S1", None), {"InstanceNumber": "1"}, ["S1.1.2", "S1.2.1"]),
    (("S1", None), {"ContentTime": "1000-1100"}, ["S1.1.2"]),
    (("S1", None), {"ContentTime": "101500.25"}, ["S1.1.2"]),
    (("S1", None), {"ContentDate": "20200115"}, ["S1.1.2", "S1.1.1", "S1.2.1"]),
    (("S1", None), {"AcquisitionDateTime": "20200115100000-"}, ["S1.1.2"]),
    (("S1", None), {"AcquisitionDateTime": "202001"}, ["S1.1.2", "S1.1.1", "S1.2.1"]),
    (("S1", None), {"Modality": "SR"}, ["S1.2.1"]),  # series attribute through the parent
    (("S1", "S1.2"), {"SOPClassUID": CT}, []),
    (("S1", "S2.1"), {}, []),  # the series is not in that study
    ((None, None), {"Rows": "256"}, ["S4.2.1"]),
    ((None, None), {"PatientName": "mueller^hans"}, ["S2.1.2", "S2.1.1"]),
    ((None, None), {"StudyDate": "20200115-", "SOPClassUID": MR}, ["S2.1.2", "S2.1.1"]),
    ((None, None), {"StudyInstanceUID": uid("S3")}, ["S3.1.1"]),
    ((None, None), {"AcquisitionDateTime": "2019-2020"}, None),
])
def test_instance_matching(db, route, params, expected):
    study = uid(route[0]) if route[0] else None
    series = uid(route[1].split(".")[0], int(route[1].split(".")[1])) if route[1] else None
    got = keys(db, I, params, study=study, series=series)
    if expected is None:  # all with an acquisition date-time in 2019-2020 (S4 is 2021, S5 has no date)
        expected = ["S1.1.2", "S1.1.1", "S1.2.1", "S2.1.2", "S2.1.1", "S3.1.1", "S6.1.1", "S7.1.1"]
    assert got == expected


# ---- tenants ---------------------------------------------------------------------------------

def test_tenants_are_isolated(db):
    assert keys(db, S, {"PatientID": "PID-1"}, tenant="B") == ["S1"]
    _, (obj,) = find(db, S, {"PatientID": "PID-1"}, tenant="B")
    assert obj["00081030"]["Value"] == ["B's copy"]
    assert len(keys(db, S, tenant="B")) == 1
    assert keys(db, SE, study=uid("S1"), tenant="B") == ["S1.1"]  # A's S1 has two series
    assert keys(db, I, study=uid("S1"), tenant="B") == ["S1.1.1"]
    assert keys(db, I, {"PatientName": "müller*"}, tenant="B") == ["S1.1.1"]
    assert keys(db, S, {"PatientName": "Meier", "fuzzymatching": "true"}, tenant="B") == []
    for level in (S, SE, I):
        assert keys(db, level, tenant="C") == []
    _, (obj,) = find(db, S, {"PatientID": "PID-1", "includefield": "PatientAge"}, tenant="B")
    assert obj["00101010"]["Value"] == ["045Y"]
    _, objs = find(db, S, {"PatientID": "PID-1", "includefield": "OperatorsName"}, tenant="B")
    assert [o["00081070"]["Value"][0]["Alphabetic"] for o in objs] == ["Operator^S1^1^1"]
    # A's S1 (two series, three instances) is never counted for B
    assert objs[0]["00201208"]["Value"] == [1]


# ---- pagination -----------------------------------------------------------------------------

def test_pagination_is_stable_and_flags_more(db):
    pages = []
    for offset in range(0, 9, 3):
        page, _ = find(db, S, {"offset": str(offset)}, limit=3)
        pages.append(page)
    got = [["S" + r.study_uid[len(UID) + 1:] for r in p.rows] for p in pages]
    assert got == [STUDY_ORDER[0:3], STUDY_ORDER[3:6], STUDY_ORDER[6:]]
    assert [p.more for p in pages] == [True, True, False]
    page, _ = find(db, S, limit=7)
    assert len(page.rows) == 7 and not page.more
    page, _ = find(db, S, limit=0)
    assert page.rows == [] and page.more
    page, _ = find(db, S, {"offset": "100"})
    assert page.rows == [] and not page.more

    all_series = keys(db, SE)
    assert sum((keys(db, SE, {"offset": str(o)}, limit=2) for o in range(0, 10, 2)), []) == all_series
    all_instances = keys(db, I)
    assert sum((keys(db, I, {"offset": str(o)}, limit=4) for o in range(0, 12, 4)), []) == all_instances
    page, _ = find(db, I, limit=len(all_instances) - 1)
    assert page.more


# ---- returned attributes ------------------------------------------------------------------------

def test_study_result_attributes(db):
    _, (obj,) = find(db, S, {"PatientID": "PID-1"})
    assert list(obj) == sorted(obj)
    assert obj["0020000D"]["Value"] == [uid("S1")]
    assert obj["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    assert obj["00080061"]["Value"] == ["CT", "SR"]
    assert obj["00201206"]["Value"] == [2] and obj["00201208"]["Value"] == [3]
    assert obj["00081190"]["Value"] == [f"{BASE}/studies/{uid('S1')}"]
    assert "00101010" not in obj and "0020000E" not in obj
    json.dumps(obj)


def test_includefield_from_meta_at_every_level(db):
    _, (obj,) = find(db, S, {"PatientID": "PID-1", "includefield": "PatientAge,00081070"})
    assert obj["00101010"]["Value"] == ["045Y"]
    assert obj["00081070"]["Value"][0]["Alphabetic"] == "Operator^S1^1^1"  # the first stored instance
    _, objs = find(db, SE, {"includefield": "OperatorsName"}, study=uid("S1"))
    assert [o["00081070"]["Value"][0]["Alphabetic"] for o in objs] == ["Operator^S1^1^1", "Operator^S1^2^1"]
    assert "00100010" not in objs[0]  # scoped to the study: no study attributes ...
    assert objs[0]["0020000D"]["Value"] == [uid("S1")]  # ... but its UID
    _, objs = find(db, I, {"includefield": "OperatorsName,PixelData"}, study=uid("S1"), series=uid("S1", 1))
    assert [o["00081070"]["Value"][0]["Alphabetic"] for o in objs] == ["Operator^S1^1^2", "Operator^S1^1^1"]
    assert objs[1]["7FE00010"]["BulkDataURI"] == (
        f"{BASE}/studies/{uid('S1')}/series/{uid('S1', 1)}/instances/{uid('S1', 1, 1)}/bulk/7FE00010")
    _, objs = find(db, S, {"includefield": "PatientAge"})
    assert all(o["00101010"]["Value"] == ["045Y"] for o in objs) and len(objs) == 7


def test_includefield_all_and_parent_attributes(db):
    _, objs = find(db, I, {"includefield": "all", "SOPClassUID": SR})
    (obj,) = objs
    assert list(obj) == sorted(obj)
    assert obj["00101010"]["Value"] == ["045Y"] and obj["00100010"] and obj["00080060"]["Value"] == ["SR"]
    assert obj["7FE00010"]["BulkDataURI"].startswith(BASE + "/studies/")
    assert obj["00083002"]["Value"] == [ELE]
    assert obj["00081190"]["Value"] == [f"{BASE}/studies/{uid('S1')}/series/{uid('S1', 2)}/instances/{uid('S1', 2, 1)}"]
    _, (obj,) = find(db, SE, {"includefield": "all", "Modality": "SR"}, study=uid("S1"))
    assert obj["00100010"] and obj["00201209"]["Value"] == [1] and obj["00080061"]["Value"] == ["CT", "SR"]
    assert "00101010" not in obj
    # unscoped series: the study attributes by default; available transfer syntaxes of the series
    _, objs = find(db, SE, {"PatientID": "PID-2"})
    assert objs[0]["00100020"]["Value"] == ["PID-2"] and objs[0]["00080020"]["Value"] == ["20200131"]
    assert objs[0]["00083002"]["Value"] == [ELE, JPEG]
    # study-scoped instances carry the series attributes, not the study ones
    _, objs = find(db, I, study=uid("S2"))
    assert objs[0]["00080060"]["Value"] == ["MR"] and "00100010" not in objs[0]
    assert [o["00083002"]["Value"] for o in objs] == [[ELE], [JPEG]]
    # a matching key of the study is returned even when scoped
    _, objs = find(db, I, {"PatientID": "PID-2"}, study=uid("S2"), series=uid("S2", 1))
    assert objs[0]["00100020"]["Value"] == ["PID-2"] and "00080060" not in objs[0]


# ---- plans and speed (SQLite) ----------------------------------------------------------------------

def _plan(session, params, level=S) -> str:
    query, _ = parse_query(level, list(params.items()), study_uid=None, series_uid=None,
                           default_limit=100, max_limit=1000)
    stmt = index.statement("A", query, sqlite=True)
    compiled = stmt.compile(dialect=session.get_bind().dialect)
    rows = session.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                                tuple(compiled.params[k] for k in compiled.positiontup)).all()
    return " | ".join(r[-1] for r in rows)


def test_sqlite_plans_use_the_indexes(db):
    if db.get_bind().dialect.name != "sqlite":
        pytest.skip("SQLite query plans")
    assert "ix_study_tenant_date" in _plan(db, {})
    assert "ix_study_tenant_patient_id" in _plan(db, {"PatientID": "PID-1"})
    assert "ix_study_tenant_date" in _plan(db, {"StudyDate": "20200101-20200131"})
    assert "ix_study_tenant_pn" in _plan(db, {"PatientName": "MUELL*"})
    # lower levels start from the narrowest index, whatever level it belongs to
    plan = _plan(db, {"PatientID": "x"}, SE)
    assert plan.startswith("SEARCH study USING INDEX ix_study_tenant_patient_id") and "ix_series_study" in plan
    plan = _plan(db, {"PatientID": "x"}, I)
    assert plan.startswith("SEARCH study USING INDEX ix_study_tenant_patient_id") and "ix_instance_study" in plan
    plan = _plan(db, {"StudyDate": "20200101-"}, SE)
    assert plan.startswith("SEARCH study USING INDEX ix_study_tenant_date")
    plan = _plan(db, {"Modality": "CT"}, I)
    assert plan.startswith("SEARCH series USING INDEX ix_series_tenant_modality") and "ix_instance_series" in plan
    plan = _plan(db, {"SOPInstanceUID": "1.2"}, I)
    assert plan.startswith("SEARCH instance USING INDEX sqlite_autoindex_instance")


def test_study_list_speed_on_sqlite(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'big.sqlite3'}")
    create_schema(engine)
    attrs = _json(_ds(PatientName="Doe^John", PatientID="P", StudyDate="20200101", StudyInstanceUID="1.2"))
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(Study.__table__.insert(), [
            dict(tenant="A", study_uid=f"1.2.{i}", patient_id=f"P{i % 3000}", patient_name=f"Doe^John{i}",
                 patient_name_norm=f"DOE^JOHN{i}", study_date=f"20{10 + i % 14:02d}{1 + i % 12:02d}{1 + i % 28:02d}",
                 study_time=f"{i % 24:02d}0000.000000", modalities_in_study="CT", number_of_series=1,
                 number_of_instances=1, attrs=attrs, revision=0, created_at=now, updated_at=now)
            for i in range(12_000)
        ])
    with Session(engine) as session:
        find(session, S, limit=100)  # warm up
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            page, _ = find(session, S, limit=100)
            best = min(best, time.perf_counter() - t0)
        assert len(page.rows) == 100 and page.more
        assert best < 0.05, f"study list took {best * 1000:.1f} ms"
    engine.dispose()
