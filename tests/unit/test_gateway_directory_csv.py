"""The operator's site CSV (README "Directory import"): parsing, per-row errors with line numbers, and the FHIR
resources of a row (pure: no database, no files)."""

from __future__ import annotations

import pytest

from server.crypto import export_public_key, generate_key
from server.crypto.errors import OpenPGPError
from server.gateway.directory import (CSV_COLUMNS, RowError, SiteRow, parse_csv, recipient_from_endpoint,
                                      site_ids, site_resources)

HEADER = ",".join(CSV_COLUMNS) + "\n"
ROW = "bremen,Klinikum Bremen-Mitte,Bremen,5-2.58.1,dicom@bremen.example.de,20000000,1.7,bremen.asc,TKmed\n"


@pytest.fixture(scope="module")
def armored():
    return export_public_key(generate_key("Bremen <dicom@bremen.example.de>", bits=2048)).decode("ascii")


def test_one_row():
    [row] = parse_csv(HEADER + ROW)
    assert row == SiteRow(2, "bremen", "Klinikum Bremen-Mitte", "Bremen", "5-2.58.1", "dicom@bremen.example.de",
                          20_000_000, "1.7", "bremen.asc", "TKmed")
    assert row.key_is_path


def test_semicolons_bom_mailto_optional_columns_and_any_column_order():
    text = "\ufeffaddress;site_id;organization;city;drg_profile_version;public_key\r\n" \
           "mailto:a@b.example.de;b;Praxis B;Köln;1.5;b.asc\r\n"
    [row] = parse_csv(text)
    assert (row.site_id, row.address, row.telematik_id, row.max_mail_size, row.network) == \
        ("b", "a@b.example.de", None, None, None)


def test_quoted_multiline_key_and_line_numbers(armored):
    quoted = '"' + armored + '"'
    text = HEADER + ROW.replace("bremen.asc", quoted) + ROW.replace("bremen", "oldenburg")
    first, second = parse_csv(text)
    assert not first.key_is_path and first.public_key == armored.strip()
    assert second.line == 3 + armored.count("\n")


@pytest.mark.parametrize("row, words", [
    (ROW.replace("bremen,", "bad id,", 1), "site_id"),
    (ROW.replace("dicom@bremen.example.de", "no-address"), "address"),
    (ROW.replace("20000000", "-5"), "max_mail_size"),
    (ROW.replace(",1.7,", ",2.0,"), "drg_profile_version"),
    (ROW.replace("Klinikum Bremen-Mitte", ""), "missing organization"),
    (ROW.replace(",TKmed", ""), "8 fields"),
])
def test_row_errors_name_the_column_and_line(row, words):
    [error] = parse_csv(HEADER + "\n" + row)
    assert error.line == 3 and words in error.message


def test_header_errors_and_duplicates():
    assert parse_csv("") == [RowError(1, "empty file")]
    [error] = parse_csv("site_id,colour\n")
    assert error.line == 1 and "unknown column(s) colour" in error.message and "missing column(s)" in error.message
    rows = parse_csv(HEADER + ROW + ROW)
    assert isinstance(rows[0], SiteRow) and rows[1] == RowError(3, "site_id 'bremen' repeats line 2")


def test_site_resources_are_a_valid_recipient(armored):
    [row] = parse_csv(HEADER + ROW)
    org, endpoint, service = site_resources(row, armored)
    assert [r["id"] for r in (org, service, endpoint)] == list(site_ids("bremen"))
    assert org["identifier"] == [{"system": "https://gematik.de/fhir/sid/telematik-id", "value": "5-2.58.1"}]
    assert service["endpoint"] == [{"reference": "Endpoint/bremen-dicom-email"}]
    assert service["program"] == [{"text": "TKmed"}]
    recipient = recipient_from_endpoint(endpoint)
    assert (recipient.address, recipient.max_mail_size, recipient.drg_profile_version) == \
        ("dicom@bremen.example.de", 20_000_000, "1.7")


def test_site_resources_refuse_a_bad_key():
    [row] = parse_csv(HEADER + ROW)
    with pytest.raises(OpenPGPError):
        site_resources(row, "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUBLIC KEY BLOCK-----\n")
