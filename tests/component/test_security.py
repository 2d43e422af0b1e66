"""Tokens, scopes and tenant isolation on every DICOMweb route (RFC 6750, SMART v2 scopes)."""

from __future__ import annotations

import re

import pytest

from server.security.tokens import issue, load_or_create_key
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart

STUDY, SERIES, SOP = "1.2.826.0.1.10", "1.2.826.0.1.11", "1.2.826.0.1.12"
VALUES = {"study": STUDY, "series": SERIES, "instance": SOP, "frames": "1", "path": "7FE00010",
          "kind": "thumbnail", "level": "0", "col": "0", "row": "0"}
READ_ONLY = "system/*.rs"
WRITE_ONLY = "system/ImagingStudy.c"


def dicomweb_routes(app) -> list[tuple[str, str]]:
    """(method, concrete URL) of every DICOMweb route, placeholders filled with tenant A's UIDs."""
    out = []
    for path, operations in app.openapi()["paths"].items():
        if path.startswith("/dicomweb"):
            url = re.sub(r"\{(\w+)\}", lambda m: VALUES[m.group(1)], path)
            out.extend((method.upper(), url) for method in operations)
    return sorted(out)


@pytest.fixture
def tenant_a(client, settings):
    body, ctype = multipart([make_instance(study=STUDY, series=SERIES, sop=SOP)])
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **auth(make_token(settings, "site-a"))})
    assert r.status_code == 200
    return body, ctype


def test_every_route_is_listed(app):
    routes = dicomweb_routes(app)
    assert len(routes) >= 20
    assert ("POST", "/dicomweb/studies") in routes


def test_missing_token_401_everywhere(client, app):
    for method, url in dicomweb_routes(app):
        r = client.request(method, url)
        assert r.status_code == 401, (method, url)
        assert r.headers["www-authenticate"].startswith("Bearer"), (method, url)


@pytest.mark.parametrize("header", ["Bearer", "Bearer abc.def.ghi", "Basic dXNlcjpwYXNz", "Bearer x"])
def test_bad_token_401(client, app, header):
    for method, url in dicomweb_routes(app)[:6]:
        r = client.request(method, url, headers={"Authorization": header})
        assert r.status_code == 401
        assert "Bearer" in r.headers["www-authenticate"]


def test_forged_and_expired_tokens_401(client, settings, tmp_path):
    other_key = load_or_create_key(tmp_path / "other")
    forged = issue(other_key, tenant="site-a", scope="system/*.cruds", ttl_seconds=60)
    expired = issue(load_or_create_key(settings.data_dir), tenant="site-a", scope="system/*.cruds", ttl_seconds=-1)
    for token in (forged, expired):
        r = client.get("/dicomweb/studies", headers=auth(token))
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_read_scope_cannot_store_403(client, settings):
    body, ctype = multipart([make_instance()])
    r = client.post("/dicomweb/studies", content=body,
                    headers={"Content-Type": ctype, **auth(make_token(settings, scope=READ_ONLY))})
    assert r.status_code == 403


def test_write_scope_cannot_read_403(client, app, settings):
    token = auth(make_token(settings, scope=WRITE_ONLY))
    for method, url in dicomweb_routes(app):
        if method == "GET":
            assert client.get(url, headers=token).status_code == 403, url


@pytest.mark.parametrize("scope", ["dicomweb.read", "system/ImagingStudy.rs", "system/*.read", "system/*.*"])
def test_read_scopes_grant_search(client, settings, scope):
    assert client.get("/dicomweb/studies", headers=auth(make_token(settings, scope=scope))).status_code in (200, 204)


def test_other_tenant_sees_nothing(client, app, settings, tenant_a):
    token_b = auth(make_token(settings, "site-b"))
    token_a = auth(make_token(settings, "site-a"))
    for method, url in dicomweb_routes(app):
        if method != "GET":
            continue
        rb = client.get(url, headers=token_b)
        ra = client.get(url, headers=token_a)
        if url in ("/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances") or url.endswith(("/series", "/instances")):
            assert ra.status_code == 200, url
            assert rb.status_code == 204, url  # finds nothing
        else:
            # a CT series is no slide: the WSI tile routes answer 404 for its owner too
            assert ra.status_code in (200, 406) or (ra.status_code == 404 and "/tiles" in url), (url, ra.status_code)
            assert rb.status_code == 404, (url, rb.status_code)  # not 403: existence does not leak


def test_other_tenant_can_store_same_uids_separately(client, settings, tenant_a):
    body, ctype = tenant_a
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **auth(make_token(settings, "site-b"))})
    assert r.status_code == 200
    for tenant in ("site-a", "site-b"):
        r = client.get("/dicomweb/instances", headers=auth(make_token(settings, tenant)))
        assert len(r.json()) == 1
