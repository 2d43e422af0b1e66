"""Client authentication of the token endpoint: secrets, JWKs, client assertions, scopes (RFC 6749, RFC 7523,
SMART Backend Services)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.errors import ServerError
from server.security import oauth
from server.security.oauth import (ASSERTION_TYPE_JWT_BEARER, OAuthError, OAuthErrorCode, RegisteredClient,
                                   TokenRequest, decode_assertion, exchange, grant_scopes, hash_secret, jwk_of,
                                   parse_basic, parse_form, parse_jwks, sign_assertion, verify_assertion,
                                   verify_secret)
from server.security.tokens import verify

AUD = "https://gw.example/auth/token"
NOW = 1_800_000_000
CID = "c1"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


def _jwks(*keys) -> str:
    return parse_jwks(json.dumps({"keys": [jwk_of(k.public_key(), kid=f"k{i}") for i, k in enumerate(keys)]}))


def _claims(**over) -> dict:
    return {"iss": CID, "sub": CID, "aud": AUD, "exp": NOW + 240, "jti": "j-1", **over}


@pytest.fixture(scope="module")
def client(rsa_key, ec_key) -> RegisteredClient:
    return RegisteredClient(client_id=CID, tenant="site-a", scope="system/*.rs system/Task.cu",
                            jwks=_jwks(rsa_key, ec_key))


def _verify(token: str, client: RegisteredClient, aud: str = AUD, now: float = NOW):
    return verify_assertion(decode_assertion(token), client, aud, now=now)


def _fails(token: str, client: RegisteredClient, text: str, **kw) -> None:
    with pytest.raises(OAuthError) as info:
        _verify(token, client, **kw)
    assert info.value.code is OAuthErrorCode.INVALID_CLIENT
    assert text in info.value.message


# --- client assertions --------------------------------------------------------------------------------------


def test_good_rs384(client, rsa_key):
    assert _verify(sign_assertion(rsa_key, _claims(), alg="RS384", kid="k0"), client) == ("j-1", NOW + 240)


def test_good_es384(client, ec_key):
    token = sign_assertion(ec_key, _claims(jti="j-2"), alg="ES384", kid="k1")
    assert len(base64.urlsafe_b64decode(token.split(".")[2] + "==")) == 96  # raw r||s (RFC 7518 3.4)
    assert _verify(token, client) == ("j-2", NOW + 240)


def test_without_kid_every_matching_key_is_tried(client, ec_key):
    assert _verify(sign_assertion(ec_key, _claims(), alg="ES384"), client)[0] == "j-1"


def test_aud_may_be_a_list(client, rsa_key):
    assert _verify(sign_assertion(rsa_key, _claims(aud=["x", AUD]), alg="RS384"), client)[0] == "j-1"


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256", "none", None])
def test_wrong_alg(client, rsa_key, alg):
    token = sign_assertion(rsa_key, _claims(), alg="RS384", kid="k0")
    header = {"alg": alg, "typ": "JWT", "kid": "k0"}
    forged = oauth._b64(json.dumps(header).encode()) + token[token.index("."):]
    _fails(forged, client, "alg must be")


def test_alg_key_type_mismatch(client, rsa_key):
    # an RS384 assertion whose kid names the EC key
    _fails(sign_assertion(rsa_key, _claims(), alg="RS384", kid="k1"), client, "no registered key")


def test_unknown_kid(client, rsa_key):
    _fails(sign_assertion(rsa_key, _claims(), alg="RS384", kid="other"), client, "no registered key")


def test_expired(client, rsa_key):
    _fails(sign_assertion(rsa_key, _claims(exp=NOW - 60), alg="RS384"), client, "expired")


def test_exp_more_than_five_minutes_ahead(client, rsa_key):
    _fails(sign_assertion(rsa_key, _claims(exp=NOW + 3600), alg="RS384"), client, "five minutes")


@pytest.mark.parametrize("exp", [None, "soon", 1.5e9, True])
def test_exp_must_be_an_integer(client, rsa_key, exp):
    claims = _claims(exp=exp) if exp is not None else {k: v for k, v in _claims().items() if k != "exp"}
    _fails(sign_assertion(rsa_key, claims, alg="RS384"), client, "exp")


def test_wrong_aud(client, rsa_key):
    _fails(sign_assertion(rsa_key, _claims(aud="https://evil.example/auth/token"), alg="RS384"), client, "aud")
    _fails(sign_assertion(rsa_key, _claims(), alg="RS384"), client, "aud", aud="https://gw.example/other")


@pytest.mark.parametrize("over", [{"iss": "c2"}, {"sub": "c2"}, {"iss": None}])
def test_iss_and_sub_are_the_client(client, rsa_key, over):
    _fails(sign_assertion(rsa_key, _claims(**over), alg="RS384"), client, "iss and sub")


@pytest.mark.parametrize("jti", [None, "", 7, "x" * 256])
def test_jti_required(client, rsa_key, jti):
    claims = _claims(jti=jti) if jti is not None else {k: v for k, v in _claims().items() if k != "jti"}
    _fails(sign_assertion(rsa_key, claims, alg="RS384"), client, "jti")


def test_not_yet_valid(client, rsa_key):
    _fails(sign_assertion(rsa_key, _claims(nbf=NOW + 120), alg="RS384"), client, "not yet valid")


@pytest.mark.parametrize("alg,kid", [("RS384", "k0"), ("ES384", "k1")])
def test_tampered_signature_and_claims(client, rsa_key, ec_key, alg, kid):
    token = sign_assertion(rsa_key if alg == "RS384" else ec_key, _claims(), alg=alg, kid=kid)
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 1
    _fails(f"{head}.{body}.{oauth._b64(bytes(raw))}", client, "signature")
    other = oauth._b64(json.dumps(_claims(sub=CID, jti="j-other")).encode())
    _fails(f"{head}.{other}.{sig}", client, "signature")
    _fails(f"{head}.{body}.", client, "signature")


def test_signed_by_another_key(client):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _fails(sign_assertion(stranger, _claims(), alg="RS384", kid="k0"), client, "signature")


def test_client_without_keys(rsa_key):
    secret_client = RegisteredClient(client_id=CID, tenant="t", scope="system/*.rs", secret_hash=hash_secret("s"))
    _fails(sign_assertion(rsa_key, _claims(), alg="RS384"), secret_client, "no registered public key")


@pytest.mark.parametrize("text", ["", "a.b", "a.b.c.d", "!!.??.**", "e30.e30", "W10.e30.", "x" * 20000])
def test_malformed_assertions(text):
    with pytest.raises(OAuthError) as info:
        decode_assertion(text)
    assert info.value.code is OAuthErrorCode.INVALID_CLIENT


# --- JWKs ---------------------------------------------------------------------------------------------------


def test_jwks_round_trip_and_single_jwk(rsa_key, ec_key):
    single = parse_jwks(json.dumps(jwk_of(ec_key.public_key(), kid="e")))
    assert [k["kid"] for k in json.loads(single)["keys"]] == ["e"]
    pub = oauth.public_key(json.loads(_jwks(rsa_key))["keys"][0])
    assert pub.public_numbers() == rsa_key.public_key().public_numbers()


@pytest.mark.parametrize("make,message", [
    (lambda: {"kty": "oct", "k": "AAAA"}, "kty"),
    (lambda: {**jwk_of(ec.generate_private_key(ec.SECP256R1()).public_key()), "crv": "P-256"}, "P-384"),
    (lambda: jwk_of(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()), "2048"),
    (lambda: {**jwk_of(ec.generate_private_key(ec.SECP384R1()).public_key()), "d": "AAAA"}, "private key"),
    (lambda: {**jwk_of(ec.generate_private_key(ec.SECP384R1()).public_key()), "use": "enc"}, "use"),
    (lambda: {**jwk_of(ec.generate_private_key(ec.SECP384R1()).public_key()), "alg": "ES256"}, "alg"),
    (lambda: {"kty": "RSA", "n": "***", "e": "AQAB"}, "invalid JWK"),
])
def test_bad_jwks(make, message):
    with pytest.raises(ServerError) as info:
        parse_jwks(json.dumps({"keys": [make()]}))
    assert message in info.value.message


@pytest.mark.parametrize("text", ["not json", "[]", '{"keys": []}', '{"keys": [1]}'])
def test_bad_jwk_sets(text):
    with pytest.raises(ServerError):
        parse_jwks(text)


# --- secrets ------------------------------------------------------------------------------------------------


def test_secret_hashing():
    stored = hash_secret("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_secret("s3cret", stored)
    assert not verify_secret("s3cret ", stored) and not verify_secret("", stored)
    assert hash_secret("s3cret") != stored  # salted
    assert hash_secret("x", salt=b"0" * 16) == hash_secret("x", salt=b"0" * 16)


@pytest.mark.parametrize("stored", ["", "plain", "md5$1$2$3$4$5", "scrypt$99$8$1$AA$AA", "scrypt$x$8$1$AA$AA",
                                    "scrypt$14$8$1$!!$AA"])
def test_malformed_hashes_never_verify(stored):
    assert not verify_secret("anything", stored)


def test_new_secrets_are_distinct():
    assert len({oauth.new_secret() for _ in range(20)}) == 20
    assert len(oauth.new_secret()) >= 43


# --- scopes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requested,registered,granted", [
    ("system/*.rs", "system/*.rs system/Task.cu", "system/*.rs"),
    ("system/Task.rs", "system/*.rs", "system/Task.rs"),
    ("system/*.cruds", "system/*.rs system/Task.cu", "system/*.rs system/Task.cu"),
    ("system/*.rs", "system/Task.cruds", "system/Task.rs"),
    ("system/Task.cruds system/Patient.d", "system/*.rs", "system/Task.rs"),
    ("system/*.read", "system/*.cruds", "system/*.read"),
    ("dicomweb.read", "system/*.rs", "dicomweb.read"),
    ("system/ImagingStudy.c", "dicomweb.write", "system/ImagingStudy.c"),
    ("system/*.cruds", "dicomweb.read", "system/ImagingStudy.rs"),
    ("system/Task.rs system/Task.rs", "system/*.rs", "system/Task.rs"),
    ("user/*.rs system/Task.r", "system/*.rs", "system/Task.r"),
])
def test_scope_intersection(requested, registered, granted):
    assert grant_scopes(requested, registered) == granted


@pytest.mark.parametrize("requested,registered", [
    ("system/Task.d", "system/*.rs"), ("system/Patient.rs", "system/Task.cruds"), ("user/*.rs", "system/*.rs"),
    ("system/*.xyz", "system/*.rs"), ("openid", "system/*.rs")])
def test_scope_refused(requested, registered):
    with pytest.raises(OAuthError) as info:
        grant_scopes(requested, registered)
    assert info.value.code is OAuthErrorCode.INVALID_SCOPE


# --- the exchange -------------------------------------------------------------------------------------------


class Registry:
    def __init__(self, *clients: RegisteredClient) -> None:
        self.clients = {c.client_id: c for c in clients}
        self.used: set[tuple[str, str]] = set()

    def get(self, client_id):
        return self.clients.get(client_id)

    def use_jti(self, client_id, jti, exp, now):
        if (client_id, jti) in self.used:
            return False
        self.used.add((client_id, jti))
        return True


KEY = b"k" * 32


def _exchange(registry, params, basic=None, now=NOW):
    return exchange(TokenRequest(params=params, basic=basic), clients=registry, key=KEY, audience=AUD, now=now)


def _code(registry, params, basic=None) -> OAuthErrorCode:
    with pytest.raises(OAuthError) as info:
        _exchange(registry, params, basic)
    return info.value.code


def test_exchange_with_assertion_and_replay(client, rsa_key):
    registry = Registry(client)
    params = {"grant_type": "client_credentials", "scope": "system/*.rs", "client_assertion_type":
              ASSERTION_TYPE_JWT_BEARER, "client_assertion": sign_assertion(rsa_key, _claims(), alg="RS384")}
    out = _exchange(registry, params)
    assert out.body()["token_type"] == "bearer" and out.expires_in == oauth.ACCESS_TOKEN_TTL
    principal = verify(KEY, out.access_token, now=NOW)
    assert principal.tenant == "site-a" and principal.subject == CID and principal.scopes == {"system/*.rs"}
    assert _code(registry, params) is OAuthErrorCode.INVALID_CLIENT  # replayed jti


def test_exchange_unknown_client(rsa_key, client):
    params = {"grant_type": "client_credentials", "scope": "system/*.rs", "client_assertion_type":
              ASSERTION_TYPE_JWT_BEARER, "client_assertion": sign_assertion(rsa_key, _claims(), alg="RS384")}
    assert _code(Registry(), params) is OAuthErrorCode.INVALID_CLIENT
    assert _code(Registry(), {"grant_type": "client_credentials", "scope": "system/*.rs"},
                 ("nobody", "x")) is OAuthErrorCode.INVALID_CLIENT


def test_exchange_with_secret():
    c = RegisteredClient(client_id="s1", tenant="site-b", scope="system/Task.cruds", secret_hash=hash_secret("pw"))
    registry = Registry(c)
    form = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    out = _exchange(registry, form, ("s1", "pw"))
    assert out.scope == "system/Task.rs"
    out = _exchange(registry, {**form, "client_id": "s1", "client_secret": "pw"})
    assert verify(KEY, out.access_token, now=NOW).tenant == "site-b"
    assert _code(registry, form, ("s1", "wrong")) is OAuthErrorCode.INVALID_CLIENT
    assert _code(registry, {**form, "client_secret": "pw"}) is OAuthErrorCode.INVALID_REQUEST  # no client_id
    assert _code(registry, {**form, "client_id": "s1", "client_secret": "pw"}, ("s1", "pw")) \
        is OAuthErrorCode.INVALID_REQUEST  # two methods
    assert _code(registry, {"grant_type": "password", "scope": "system/*.rs"}, ("s1", "pw")) \
        is OAuthErrorCode.UNSUPPORTED_GRANT_TYPE
    assert _code(registry, {"scope": "system/*.rs"}, ("s1", "pw")) is OAuthErrorCode.INVALID_REQUEST
    assert _code(registry, {"grant_type": "client_credentials"}, ("s1", "pw")) is OAuthErrorCode.INVALID_REQUEST
    assert _code(registry, {**form, "scope": "system/Patient.rs"}, ("s1", "pw")) is OAuthErrorCode.INVALID_SCOPE
    assert _code(registry, form) is OAuthErrorCode.INVALID_CLIENT  # no authentication at all


def test_form_and_basic_parsing():
    assert parse_form([("a", "1"), ("b", "")]) == {"a": "1", "b": ""}
    with pytest.raises(OAuthError):
        parse_form([("a", "1"), ("a", "2")])
    assert parse_basic("Basic " + base64.b64encode(b"my%20id:p%3Aw").decode()) == ("my id", "p:w")
    assert parse_basic(None) is None and parse_basic("Bearer x") is None
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()):
        with pytest.raises(OAuthError):
            parse_basic(bad)
