"""QIDO-RS query parsing and rendering (PS3.18 8.3.4, 10.6; PS3.4 C.2.2.2), without a database."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from server.dicom.attributes import Level
from server.dicomweb.qido import (
    Op,
    QidoRow,
    default_parents,
    needs_meta,
    parents_needed,
    parse_query,
    render,
)
from server.errors import ErrorKind, ServerError

S, SE, I = Level.STUDY, Level.SERIES, Level.INSTANCE


def parse(params, level=S, *, study_uid=None, series_uid=None, default_limit=100, max_limit=1000):
    if isinstance(params, dict):
        params = list(params.items())
    return parse_query(level, params, study_uid=study_uid, series_uid=series_uid,
                       default_limit=default_limit, max_limit=max_limit)


def one(params, level=S):
    query, _ = parse(params, level)
    assert len(query.matches) == 1
    return query.matches[0]


# ---- matching rules -----------------------------------------------------------------------------

MATCHES = [
    # (level, key, value, op, values, low, high)
    (S, "PatientID", "PID-1", Op.EQUAL, ("PID-1",), None, None),
    (S, "00100020", "PID-1", Op.EQUAL, ("PID-1",), None, None),
    (S, "00100020", " PID-1 ", Op.EQUAL, ("PID-1",), None, None),
    (S, "0020000d", "1.2.3", Op.EQUAL, ("1.2.3",), None, None),
    (S, "PatientID", "", Op.UNIVERSAL, (), None, None),
    (S, "PatientID", "*", Op.UNIVERSAL, (), None, None),
    (S, "PatientID", "PID*", Op.WILDCARD, ("PID*",), None, None),
    (S, "StudyDescription", "50%?", Op.WILDCARD, ("50%?",), None, None),
    (S, "PatientName", "müller^jürgen", Op.EQUAL, ("MUELLER^JUERGEN",), None, None),
    (S, "PatientName", "Müller*", Op.WILDCARD, ("MUELLER*",), None, None),
    (S, "PatientName", "Müller^", Op.EQUAL, ("MUELLER",), None, None),
    (S, "PatientName", "*", Op.UNIVERSAL, (), None, None),
    (S, "ReferringPhysicianName", "dr*", Op.WILDCARD, ("DR*",), None, None),
    (S, "StudyInstanceUID", "1.2.3,1.2.4", Op.ANY_OF, ("1.2.3", "1.2.4"), None, None),
    (S, "StudyInstanceUID", "1.2.3\\1.2.4", Op.ANY_OF, ("1.2.3", "1.2.4"), None, None),
    (S, "ModalitiesInStudy", "CT", Op.ANY_OF, ("CT",), None, None),
    (S, "ModalitiesInStudy", "CT,MR", Op.ANY_OF, ("CT", "MR"), None, None),
    (S, "ModalitiesInStudy", "CT\\MR", Op.ANY_OF, ("CT", "MR"), None, None),
    (S, "StudyDate", "20200115", Op.EQUAL, ("20200115",), None, None),
    (S, "StudyDate", "20200101-20200131", Op.RANGE, (), "20200101", "20200131"),
    (S, "StudyDate", "-20200131", Op.RANGE, (), None, "20200131"),
    (S, "StudyDate", "20200101-", Op.RANGE, (), "20200101", None),
    (S, "StudyTime", "0800-1200", Op.RANGE, (), "080000", "120059.999999"),
    (S, "StudyTime", "08:00-12:00:30", Op.RANGE, (), "080000", "120030.999999"),
    (S, "StudyTime", "083000", Op.RANGE, (), "083000", "083000.999999"),
    (S, "StudyTime", "08", Op.RANGE, (), "080000", "085959.999999"),
    (S, "StudyTime", "083000.5", Op.RANGE, (), "083000.500000", "083000.599999"),
    (S, "StudyTime", "-1200", Op.RANGE, (), None, "120059.999999"),
    (S, "NumberOfStudyRelatedSeries", "2", Op.EQUAL, (2,), None, None),
    (SE, "Modality", "CT", Op.EQUAL, ("CT",), None, None),
    (SE, "SeriesNumber", " +3 ", Op.EQUAL, (3,), None, None),
    (SE, "PatientID", "PID-1", Op.EQUAL, ("PID-1",), None, None),  # a higher level attribute
    (I, "StudyDate", "20200101-", Op.RANGE, (), "20200101", None),
    (I, "SeriesInstanceUID", "1.2.3", Op.EQUAL, ("1.2.3",), None, None),
    (I, "Rows", "512", Op.EQUAL, (512,), None, None),
    (I, "AcquisitionDateTime", "2020", Op.RANGE, (), "20200101000000", "20201231235959.999999"),
    (I, "AcquisitionDateTime", "20200115083000", Op.RANGE, (), "20200115083000", "20200115083000.999999"),
    (I, "AcquisitionDateTime", "202001-202002", Op.RANGE, (), "20200101000000", "20200231235959.999999"),
    (I, "AcquisitionDateTime", "20200115-", Op.RANGE, (), "20200115000000", None),
    (I, "AcquisitionDateTime", "-20200115", Op.RANGE, (), None, "20200115235959.999999"),
    (I, "CompletionFlag", "COMPLETE", Op.EQUAL, ("COMPLETE",), None, None),
]


@pytest.mark.parametrize("level,key,value,op,values,low,high", MATCHES)
def test_match_rules(level, key, value, op, values, low, high):
    m = one([(key, value)], level)
    assert (m.op, m.values, m.low, m.high) == (op, values, low, high)
    assert m.key == key


def test_time_range_across_midnight():
    m = one({"StudyTime": "2300-0100"})
    assert m.wraps_midnight and (m.low, m.high) == ("230000", "010059.999999")
    assert not one({"StudyTime": "0100-2300"}).wraps_midnight


def test_pn_column_and_fuzzy_codes():
    q, _ = parse([("PatientName", "Meier"), ("fuzzymatching", "true")])
    m = q.matches[0]
    assert q.fuzzy and m.column == "patient_name_norm" and m.phonetic_column == "patient_name_phonetic"
    assert m.phonetic == ("67",)
    # fuzzymatching may come after the key; wildcard words take no part in phonetic matching
    q, _ = parse([("PatientName", "Meier^Jo*"), ("fuzzymatching", "TRUE")])
    assert q.matches[0].phonetic == ("67",)
    q, _ = parse([("PatientName", "Meier"), ("fuzzymatching", "false")])
    assert q.matches[0].phonetic == () and not q.fuzzy
    q, _ = parse([("PatientName", "Meier")])
    assert q.matches[0].phonetic == ()


def test_datetime_offset_is_ignored_with_a_warning():
    q, warnings = parse({"AcquisitionDateTime": "20200115083000+0100"}, I)
    assert (q.matches[0].low, q.matches[0].high) == ("20200115083000", "20200115083000.999999")
    assert len(warnings) == 1 and "AcquisitionDateTime" in warnings[0]
    q, _ = parse({"AcquisitionDateTime": "20200115083000+0100-20200116"}, I)
    assert (q.matches[0].low, q.matches[0].high) == ("20200115083000", "20200116235959.999999")


def test_path_parameters_are_kept():
    q, _ = parse({}, I, study_uid="1.2", series_uid="1.2.3")
    assert (q.study_uid, q.series_uid, q.level) == ("1.2", "1.2.3", I)


# ---- errors: every 400 names its parameter -----------------------------------------------------

ERRORS = [
    # (level, params, parameter)
    (S, [("PatientNam", "x")], "PatientNam"),  # unknown keyword
    (S, [("patientname", "x")], "patientname"),  # keywords are case-sensitive
    (S, [("0010001", "x")], "0010001"),  # malformed tag
    (S, [("0010001G", "x")], "0010001G"),
    (S, [("_", "1")], "_"),  # unknown parameter
    (S, [("PatientAge", "045Y")], "PatientAge"),  # a DICOM keyword we do not index
    (S, [("00101010", "045Y")], "00101010"),  # a DICOM tag we do not index
    (S, [("RequestAttributeSequence.ScheduledProcedureStepID", "1")],
     "RequestAttributeSequence.ScheduledProcedureStepID"),
    (S, [("SOPInstanceUID", "1.2")], "SOPInstanceUID"),  # lower level than the route
    (S, [("Modality", "CT")], "Modality"),
    (SE, [("00080018", "1.2")], "00080018"),
    (S, [("PatientID", "a"), ("PatientID", "b")], "PatientID"),  # twice
    (S, [("PatientID", "a"), ("00100020", "b")], "00100020"),  # twice, once as tag
    (S, [("limit", "-1")], "limit"),
    (S, [("limit", "ten")], "limit"),
    (S, [("limit", "1"), ("limit", "2")], "limit"),
    (S, [("offset", "1.5")], "offset"),
    (S, [("offset", "")], "offset"),
    (S, [("fuzzymatching", "yes")], "fuzzymatching"),
    (S, [("includefield", "NoSuchKeyword")], "includefield"),
    (S, [("includefield", "PatientName,0010002")], "includefield"),
    (S, [("includefield", "RequestAttributesSequence.ScheduledProcedureStepID")], "includefield"),
    (S, [("StudyInstanceUID", "1.2.*")], "StudyInstanceUID"),  # no wildcards for UIDs
    (S, [("StudyInstanceUID", "1.2,abc")], "StudyInstanceUID"),
    (S, [("StudyInstanceUID", "1." * 40 + "1")], "StudyInstanceUID"),
    (S, [("StudyDate", "2020")], "StudyDate"),
    (S, [("StudyDate", "20201301")], "StudyDate"),
    (S, [("StudyDate", "20200230")], "StudyDate"),
    (S, [("StudyDate", "2020-01-01")], "StudyDate"),
    (S, [("StudyDate", "-")], "StudyDate"),
    (S, [("StudyDate", "20200201-20200101")], "StudyDate"),
    (S, [("StudyDate", "20200101-x")], "StudyDate"),
    (S, [("00080020", "yesterday")], "00080020"),
    (S, [("StudyTime", "25")], "StudyTime"),
    (S, [("StudyTime", "0860")], "StudyTime"),
    (S, [("StudyTime", "08a0")], "StudyTime"),
    (S, [("StudyTime", "0800-12-00")], "StudyTime"),
    (S, [("PatientBirthDate", "1980*")], "PatientBirthDate"),
    (S, [("NumberOfStudyRelatedInstances", "many")], "NumberOfStudyRelatedInstances"),
    (SE, [("SeriesNumber", "1.5")], "SeriesNumber"),
    (I, [("AcquisitionDateTime", "2020011")], "AcquisitionDateTime"),
    (I, [("AcquisitionDateTime", "20201301")], "AcquisitionDateTime"),
    (I, [("AcquisitionDateTime", "20200102-20200101")], "AcquisitionDateTime"),
    (I, [("AcquisitionDateTime", "x-y")], "AcquisitionDateTime"),
    (I, [("Rows", "")], None),  # empty is universal: no error (checked below)
]


@pytest.mark.parametrize("level,params,parameter", ERRORS)
def test_invalid_parameters_are_named(level, params, parameter):
    if parameter is None:
        parse(params, level)
        return
    with pytest.raises(ServerError) as info:
        parse(params, level)
    assert info.value.kind is ErrorKind.INVALID
    assert info.value.parameter == parameter
    assert parameter in info.value.message or parameter.lower() in info.value.message.lower()


def test_not_indexed_and_unknown_messages_differ():
    with pytest.raises(ServerError) as known:
        parse({"PatientAge": "045Y"})
    with pytest.raises(ServerError) as unknown:
        parse({"PatientAgeX": "045Y"})
    assert "not supported" in known.value.message
    assert "not supported" not in unknown.value.message
    with pytest.raises(ServerError) as seq:
        parse({"RequestAttributeSequence.ScheduledProcedureStepID": "1"})
    assert "not supported" in seq.value.message


@given(hst.text(max_size=20))
def test_parse_never_fails_other_than_invalid(value):
    for level in (S, SE, I):
        for key in ("PatientName", "StudyDate", "StudyTime", "StudyInstanceUID", "ModalitiesInStudy",
                    "AcquisitionDateTime", "InstanceNumber", "PatientID", "limit", "offset", "includefield"):
            if level is S and key in ("AcquisitionDateTime", "InstanceNumber"):
                continue
            try:
                parse([(key, value)], level)
            except ServerError as exc:
                assert exc.kind is ErrorKind.INVALID and exc.parameter == key


# ---- includefield, limit, offset --------------------------------------------------------------

def test_includefield_parsing():
    q, _ = parse([("includefield", "PatientAge,00081070"), ("includefield", " 0010101a , ")])
    assert q.includefields == frozenset({0x00101010, 0x00081070, 0x0010101A})
    q, _ = parse([("includefield", "PatientAge"), ("includefield", "all")])
    assert q.includefields == "all"
    q, _ = parse([("includefield", "")])
    assert q.includefields == frozenset()
    q, _ = parse([])
    assert q.includefields == frozenset()
    # lower level attributes may be asked for (returned when the data has them)
    q, _ = parse([("includefield", "SOPClassUID")])
    assert q.includefields == frozenset({0x00080016})


def test_limit_and_offset():
    q, w = parse({})
    assert (q.limit, q.offset, w) == (100, 0, [])
    q, w = parse({"limit": "10", "offset": "20"})
    assert (q.limit, q.offset, w) == (10, 20, [])
    q, w = parse({"limit": "0"})
    assert q.limit == 0
    q, w = parse({"limit": "5000"})
    assert q.limit == 1000 and len(w) == 1 and "1000" in w[0]
    q, w = parse({}, default_limit=5000, max_limit=50)
    assert q.limit == 50 and w == []


def test_content_negotiation_parameters_are_left_to_the_route():
    q, w = parse([("accept", "application/dicom+json"), ("charset", "utf-8"), ("PatientID", "x")])
    assert len(q.matches) == 1 and w == []


# ---- what the SQL side fetches -------------------------------------------------------------------

def test_parents_and_meta_needed():
    q, _ = parse({}, SE)
    assert default_parents(q) == {S} and parents_needed(q) == {S} and not needs_meta(q)
    q, _ = parse({}, SE, study_uid="1.2")
    assert default_parents(q) == set() and parents_needed(q) == set()
    q, _ = parse({"PatientID": "x"}, SE, study_uid="1.2")
    assert parents_needed(q) == {S}
    q, _ = parse({}, I, study_uid="1.2")
    assert default_parents(q) == {SE}
    q, _ = parse({}, I, study_uid="1.2", series_uid="1.2.3")
    assert default_parents(q) == set()
    q, _ = parse({}, I)
    assert default_parents(q) == {S, SE}
    q, _ = parse({"includefield": "all"}, I, study_uid="1.2", series_uid="1.2.3")
    assert parents_needed(q) == {S, SE} and needs_meta(q)
    q, _ = parse({"includefield": "all"}, S)
    assert not needs_meta(q)
    q, _ = parse({"includefield": "PatientAge"}, S)
    assert needs_meta(q)
    q, _ = parse({"includefield": "StudyDescription,00081190"}, S)
    assert not needs_meta(q)
    q, _ = parse({"includefield": "SOPClassUID"}, S)  # indexed, but not at this level: from meta
    assert needs_meta(q)


# ---- rendering ---------------------------------------------------------------------------------

STUDY_ATTRS = json.dumps({
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]},
    "0020000D": {"vr": "UI", "Value": ["1.2"]},
    "00080020": {"vr": "DA", "Value": ["20200115"]},
})
SERIES_ATTRS = json.dumps({
    "0020000E": {"vr": "UI", "Value": ["1.2.3"]},
    "00080060": {"vr": "CS", "Value": ["CT"]},
})
INSTANCE_ATTRS = json.dumps({
    "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
    "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
})
META = json.dumps({
    "00101010": {"vr": "AS", "Value": ["045Y"]},
    "00081070": {"vr": "PN", "Value": [{"Alphabetic": "Op"}]},
    "7FE00010": {"vr": "OW", "BulkDataURI": "\x01/studies/1.2/series/1.2.3/instances/1.2.3.4/bulk/7FE00010"},
    "00540016": {"vr": "SQ", "Value": [{"00181074": {"vr": "OB", "BulkDataURI": "\x01/bulk/x"}}]},
})


def test_render_study_defaults_and_includefield():
    q, _ = parse({"includefield": "PatientAge,00540016"})
    row = QidoRow(study_uid="1.2", study_attrs=STUDY_ATTRS, modalities_in_study="CT\\SR", study_series=2,
                  study_instances=5, meta=META)
    (obj,) = render([row], q, "https://h/dicomweb/")
    assert list(obj) == sorted(obj)
    assert obj["00080061"] == {"vr": "CS", "Value": ["CT", "SR"]}
    assert obj["00201206"] == {"vr": "IS", "Value": [2]}
    assert obj["00201208"] == {"vr": "IS", "Value": [5]}
    assert obj["00081190"] == {"vr": "UR", "Value": ["https://h/dicomweb/studies/1.2"]}
    assert obj["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    assert obj["00101010"] == {"vr": "AS", "Value": ["045Y"]}
    assert obj["00540016"]["Value"][0]["00181074"]["BulkDataURI"] == "https://h/dicomweb/bulk/x"
    assert "00081070" not in obj and "7FE00010" not in obj
    json.dumps(obj)


def test_render_instance_all_and_scoping():
    q, _ = parse({"includefield": "all"}, I, study_uid="1.2", series_uid="1.2.3")
    row = QidoRow(study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4", study_attrs=STUDY_ATTRS,
                  series_attrs=SERIES_ATTRS, instance_attrs=INSTANCE_ATTRS, modalities_in_study="CT",
                  study_series=1, study_instances=1, series_instances=1,
                  transfer_syntaxes="1.2.840.10008.1.2.1", meta=META)
    (obj,) = render([row], q, "http://x")
    assert list(obj) == sorted(obj)
    assert obj["7FE00010"]["BulkDataURI"] == "http://x/studies/1.2/series/1.2.3/instances/1.2.3.4/bulk/7FE00010"
    assert obj["00081190"]["Value"] == ["http://x/studies/1.2/series/1.2.3/instances/1.2.3.4"]
    assert obj["00083002"] == {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]}
    assert obj["00100010"] and obj["00080060"] and obj["00101010"]

    # scoped to the series, no includefield: no study attributes but the UIDs of the parents
    q, _ = parse({}, I, study_uid="1.2", series_uid="1.2.3")
    (obj,) = render([row], q, "http://x")
    assert "00100010" not in obj and "00080060" not in obj and "00101010" not in obj
    assert obj["0020000D"]["Value"] == ["1.2"] and obj["0020000E"]["Value"] == ["1.2.3"]
    assert obj["00080018"]["Value"] == ["1.2.3.4"]

    # a matching key of a parent level is returned
    q, _ = parse({"PatientName": "M*"}, I, study_uid="1.2", series_uid="1.2.3")
    (obj,) = render([row], q, "http://x")
    assert "00100010" in obj and "00080060" not in obj


def test_render_series_unscoped_has_study_attributes():
    q, _ = parse({}, SE)
    row = QidoRow(study_uid="1.2", series_uid="1.2.3", study_attrs=STUDY_ATTRS, series_attrs=SERIES_ATTRS,
                  modalities_in_study="CT", study_series=1, study_instances=3, series_instances=3,
                  transfer_syntaxes="1.2.840.10008.1.2.1\\1.2.840.10008.1.2.4.50")
    (obj,) = render([row], q, "http://x")
    assert obj["00100010"] and obj["00080061"]["Value"] == ["CT"] and obj["00201209"]["Value"] == [3]
    assert obj["00083002"]["Value"] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"]
    assert obj["00081190"]["Value"] == ["http://x/studies/1.2/series/1.2.3"]
