"""The committed OpenAPI document matches the app (regenerate: telerad openapi)."""

from __future__ import annotations

import json
from pathlib import Path

from server.__main__ import main

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_openapi_has_not_drifted(tmp_path, capsys):
    out = tmp_path / "openapi.json"
    assert main(["openapi", "--output", str(out)]) == 0
    assert COMMITTED.exists(), "openapi/openapi.json missing: run `telerad openapi`"
    assert json.loads(out.read_text()) == json.loads(COMMITTED.read_text()), (
        "openapi/openapi.json is out of date: run `telerad openapi` and commit it")


def test_served_openapi(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/dicomweb/studies" in paths and "/healthz" in paths
