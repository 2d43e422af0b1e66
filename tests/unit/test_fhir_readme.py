"""The README's FHIR table lists what the CapabilityStatement says is served."""

from __future__ import annotations

import re
from pathlib import Path

from server.fhir.capability import capability_statement

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_matches_capability_statement():
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[A-Z][A-Za-z]+", cells[0]) and "search-type" in cells[1]:
            rows[cells[0]] = cells
    served = capability_statement("http://x/fhir")["rest"][0]["resource"]
    assert set(rows) == {r["type"] for r in served}
    for r in served:
        _, interactions, params, includes = rows[r["type"]]
        assert interactions.split(", ") == [i["code"] for i in r["interaction"]]
        listed = set(re.findall(r"`([^`]+)`", params)) | {"_id", "_lastUpdated"}
        assert listed == {p["name"] for p in r["searchParam"]}, r["type"]
        assert set(re.findall(r"`([^`]+)`", includes)) == set(r["searchInclude"]), r["type"]
