"""``POST /auth/token`` end to end on both backends: clients registered with ``telerad client add``, tokens by
client secret and by ``private_key_jwt`` (SMART Backend Services), used on FHIR and DICOMweb; every error."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.__main__ import main
from server.security.oauth import ASSERTION_TYPE_JWT_BEARER, OAuthErrorCode, jwk_of, sign_assertion
from server.security.token_routes import STATUS_BY_OAUTH_ERROR
from tests.conftest import auth, make_token
from tests.dicomdata import make_instance, multipart

AUD = "http://testserver/auth/token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def register(settings, monkeypatch, capsys, tmp_path):
    """``telerad client add`` against the test's database; returns (client_id, client_secret or None)."""
    monkeypatch.setenv("TELERAD_DATABASE_URL", settings.resolved_database_url)

    def run(scope: str, *, tenant: str = "site-a", keys=()) -> tuple[str, str | None]:
        if keys:
            path = tmp_path / f"jwks-{uuid.uuid4().hex}.json"
            path.write_text(json.dumps({"keys": [jwk_of(k.public_key(), kid=kid) for kid, k in keys]}))
            cred = ["--jwks-file", str(path)]
        else:
            cred = ["--secret"]
        capsys.readouterr()
        assert main(["client", "add", "--data-dir", str(settings.data_dir), "--tenant", tenant, "--scope", scope,
                     *cred]) == 0
        out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
        return out["client_id"], out.get("client_secret")

    return run


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def assertion(key, client_id: str, *, alg: str = "RS384", kid: str | None = "k1", **over) -> str:
    claims = {"iss": client_id, "sub": client_id, "aud": AUD, "exp": int(time.time()) + 240,
              "jti": uuid.uuid4().hex, **over}
    return sign_assertion(key, claims, alg=alg, kid=kid)


def jwt_form(token: str, scope: str = "system/*.rs") -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE_JWT_BEARER,
            "client_assertion": token}


def token_of(client, data, headers=None) -> dict:
    r = client.post("/auth/token", data=data, headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def error_of(client, data=None, headers=None, status=400, content=None) -> str:
    r = client.post("/auth/token", data=data, headers=headers or {}, content=content)
    assert r.status_code == status, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) == {"error", "error_description"} and body["error_description"]
    return body["error"]


def stow(client, token: str, study: str = "1.2.826.0.9.1"):
    body, ctype = multipart([make_instance(study=study)])
    return client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype, **auth(token)})


# --- discovery ----------------------------------------------------------------------------------------------


def test_smart_configuration_advertises_the_token_endpoint(client):
    for url in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        smart = client.get(url).json()
        assert smart["token_endpoint"] == AUD
        assert smart["grant_types_supported"] == ["client_credentials"]
        assert set(smart["token_endpoint_auth_methods_supported"]) == {
            "private_key_jwt", "client_secret_basic", "client_secret_post"}
        assert smart["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
        assert {"client-confidential-asymmetric", "client-confidential-symmetric", "permission-v2"} \
            <= set(smart["capabilities"])
        assert "system/*.rs" in smart["scopes_supported"]


def test_every_oauth_error_has_a_status():
    assert set(STATUS_BY_OAUTH_ERROR) == set(OAuthErrorCode)


# --- full flows ---------------------------------------------------------------------------------------------


def test_secret_basic_token_works_on_fhir_and_dicomweb(client, settings, register):
    assert stow(client, make_token(settings)).status_code == 200  # data of site-a, stored with an offline token
    client_id, secret = register("system/*.rs system/Task.cu")
    out = token_of(client, {"grant_type": "client_credentials", "scope": "system/*.rs"}, basic(client_id, secret))
    assert out["token_type"] == "bearer" and out["scope"] == "system/*.rs" and 0 < out["expires_in"] <= 300
    token = out["access_token"]
    r = client.get("/fhir/Task", headers=auth(token))
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"
    r = client.get("/dicomweb/studies", headers=auth(token))
    assert r.status_code == 200 and len(r.json()) == 1
    assert stow(client, token, "1.2.826.0.9.2").status_code == 403  # read scope only


def test_secret_post(client, register):
    client_id, secret = register("system/*.rs", tenant="site-b")
    out = token_of(client, {"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": client_id,
                            "client_secret": secret})
    assert client.get("/fhir/Task", headers=auth(out["access_token"])).status_code == 200


def test_tenant_comes_from_the_client(client, settings, register):
    assert stow(client, make_token(settings, tenant="site-a")).status_code == 200
    client_id, secret = register("system/*.rs", tenant="site-b")
    token = token_of(client, {"grant_type": "client_credentials", "scope": "system/*.rs"},
                     basic(client_id, secret))["access_token"]
    assert client.get("/dicomweb/studies", headers=auth(token)).status_code == 204


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_private_key_jwt(client, register, rsa_key, ec_key, alg):
    key = rsa_key if alg == "RS384" else ec_key
    client_id, secret = register("system/*.cruds", keys=[("k1", key)])
    assert secret is None
    signed = assertion(key, client_id, alg=alg)
    out = token_of(client, jwt_form(signed, "system/*.rs system/ImagingStudy.c"))
    assert out["scope"] == "system/*.rs system/ImagingStudy.c"
    token = out["access_token"]
    assert client.get("/fhir/Task", headers=auth(token)).status_code == 200
    assert stow(client, token).status_code == 200
    assert client.get("/dicomweb/studies", headers=auth(token)).status_code == 200
    # the same assertion again: replay
    assert error_of(client, jwt_form(signed)) == "invalid_client"


def test_jwks_with_both_keys_and_kid_selection(client, register, rsa_key, ec_key):
    client_id, _ = register("system/*.rs", keys=[("r", rsa_key), ("e", ec_key)])
    token_of(client, jwt_form(assertion(rsa_key, client_id, kid="r")))
    token_of(client, jwt_form(assertion(ec_key, client_id, alg="ES384", kid="e")))
    token_of(client, jwt_form(assertion(ec_key, client_id, alg="ES384", kid=None)))
    assert error_of(client, jwt_form(assertion(ec_key, client_id, alg="ES384", kid="r"))) == "invalid_client"


def test_scope_narrowing(client, register):
    client_id, secret = register("system/*.rs system/Task.cu")
    creds = basic(client_id, secret)
    out = token_of(client, {"grant_type": "client_credentials", "scope": "system/*.cruds"}, creds)
    assert out["scope"] == "system/*.rs system/Task.cu"
    out = token_of(client, {"grant_type": "client_credentials", "scope": "system/Task.cruds system/Patient.d"}, creds)
    assert out["scope"] == "system/Task.rs system/Task.cu"
    narrow = token_of(client, {"grant_type": "client_credentials", "scope": "system/Task.rs"}, creds)["access_token"]
    assert client.get("/fhir/Task", headers=auth(narrow)).status_code == 200
    assert client.get("/fhir/Patient", headers=auth(narrow)).status_code == 403
    assert client.get("/dicomweb/studies", headers=auth(narrow)).status_code == 403
    assert error_of(client, {"grant_type": "client_credentials", "scope": "system/Patient.d"}, creds) \
        == "invalid_scope"


def test_removed_client_gets_no_token(client, register, settings, capsys):
    client_id, secret = register("system/*.rs")
    form = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    token_of(client, form, basic(client_id, secret))
    assert main(["client", "remove", client_id, "--data-dir", str(settings.data_dir)]) == 0
    assert error_of(client, form, basic(client_id, secret), status=401) == "invalid_client"


# --- errors (RFC 6749 5.2) ----------------------------------------------------------------------------------


@pytest.fixture
def secret_client(register):
    return register("system/*.rs system/Task.cu")


@pytest.fixture
def jwt_client(register, rsa_key):
    return register("system/*.rs", keys=[("k1", rsa_key)])[0]


def test_invalid_request(client, secret_client):
    client_id, secret = secret_client
    creds = basic(client_id, secret)
    ok = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    assert error_of(client, content=json.dumps(ok), headers={**creds, "Content-Type": "application/json"}) \
        == "invalid_request"
    assert error_of(client, content=b"grant_type=client_credentials&grant_type=client_credentials&scope=x",
                    headers={**creds, **FORM}) == "invalid_request"
    assert error_of(client, content=b"\xff\xfe=1", headers={**creds, **FORM}) == "invalid_request"
    assert error_of(client, content=b"x" * (70 * 1024), headers={**creds, **FORM}) == "invalid_request"
    assert error_of(client, {"scope": "system/*.rs"}, creds) == "invalid_request"  # no grant_type
    assert error_of(client, {"grant_type": "client_credentials"}, creds) == "invalid_request"  # no scope
    assert error_of(client, {**ok, "client_id": client_id, "client_secret": secret}, creds) == "invalid_request"
    assert error_of(client, {**ok, "client_secret": secret}) == "invalid_request"  # no client_id
    assert error_of(client, {**ok, "client_id": "other"}, creds) == "invalid_request"


def test_invalid_request_assertion_params(client, jwt_client, rsa_key):
    form = jwt_form(assertion(rsa_key, jwt_client))
    assert error_of(client, {**form, "client_assertion_type": "urn:other"}) == "invalid_request"
    assert error_of(client, {**form, "client_assertion": ""}) == "invalid_request"


def test_invalid_client_basic_is_401(client, secret_client):
    client_id, secret = secret_client
    form = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    for headers in (basic(client_id, "wrong"), basic("unknown", secret), {"Authorization": "Basic !!!"}):
        r = client.post("/auth/token", data=form, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"
        assert r.headers["www-authenticate"].startswith("Basic")


def test_invalid_client_post_is_400(client, secret_client):
    client_id, secret = secret_client
    form = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    assert error_of(client, form) == "invalid_client"  # no authentication
    assert error_of(client, {**form, "client_id": client_id, "client_secret": "wrong"}) == "invalid_client"
    assert error_of(client, {**form, "client_id": "nobody", "client_secret": secret}) == "invalid_client"


def test_secret_client_cannot_use_assertions_and_vice_versa(client, secret_client, jwt_client, rsa_key):
    client_id, secret = secret_client
    assert error_of(client, jwt_form(assertion(rsa_key, client_id))) == "invalid_client"
    assert error_of(client, {"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": jwt_client,
                             "client_secret": "x"}) == "invalid_client"


@pytest.mark.parametrize("case", ["expired", "too_long", "wrong_aud", "wrong_iss", "unknown_client", "wrong_alg",
                                  "tampered", "other_key", "garbage", "client_id_mismatch"])
def test_invalid_client_assertions(client, jwt_client, rsa_key, ec_key, case):
    now = int(time.time())
    signed = {
        "expired": lambda: assertion(rsa_key, jwt_client, exp=now - 120),
        "too_long": lambda: assertion(rsa_key, jwt_client, exp=now + 3600),
        "wrong_aud": lambda: assertion(rsa_key, jwt_client, aud="http://testserver/fhir"),
        "wrong_iss": lambda: assertion(rsa_key, jwt_client, iss="someone"),
        "unknown_client": lambda: assertion(rsa_key, "not-registered"),
        "wrong_alg": lambda: assertion(ec_key, jwt_client, alg="ES384"),
        "tampered": lambda: assertion(rsa_key, jwt_client)[:-6] + "AAAAAA",
        "other_key": lambda: assertion(rsa.generate_private_key(public_exponent=65537, key_size=2048), jwt_client),
        "garbage": lambda: "not.a.jwt",
        "client_id_mismatch": lambda: assertion(rsa_key, jwt_client),
    }[case]()
    form = jwt_form(signed)
    if case == "client_id_mismatch":
        form["client_id"] = "someone-else"
    assert error_of(client, form) == "invalid_client"


def test_unsupported_grant_type(client, secret_client, jwt_client, rsa_key):
    client_id, secret = secret_client
    for grant in ("authorization_code", "password", "urn:ietf:params:oauth:grant-type:jwt-bearer"):
        assert error_of(client, {"grant_type": grant, "scope": "system/*.rs"}, basic(client_id, secret)) \
            == "unsupported_grant_type"
    form = {**jwt_form(assertion(rsa_key, jwt_client)), "grant_type": "refresh_token"}
    assert error_of(client, form) == "unsupported_grant_type"


def test_invalid_scope(client, secret_client):
    creds = basic(*secret_client)
    for scope in ("system/Patient.c", "user/*.rs", "patient/*.read", "openid", "system/*.zz"):
        assert error_of(client, {"grant_type": "client_credentials", "scope": scope}, creds) == "invalid_scope"


def test_token_route_is_not_bearer_protected_and_get_is_405(client):
    assert client.get("/auth/token").status_code == 405
    r = client.post("/auth/token", data={"grant_type": "client_credentials", "scope": "system/*.rs"},
                    headers={"Authorization": "Bearer abc"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_client"
