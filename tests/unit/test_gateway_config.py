"""The gateway's configuration from settings: routes, our sites' addresses, the mailboxes file (bad input = INVALID)."""

from __future__ import annotations

import json

import pytest

from server.config import Settings
from server.crypto import generate_key
from server.errors import ErrorKind, ServerError
from server.gateway.policy import parse_routes, relay_config
from server.gateway.runtime import load_mailboxes
from server.gateway.sites import Site, Sites, address_of, normalize_address
from server.mail.poll import Protocol
from server.mail.transport import TlsMode


def test_routes_like_a_transport_map():
    routes = parse_routes(" B.example=127.0.0.1:2526/none, c.example=[::1], d.example.=mx.d.example:465/implicit")
    assert (routes["b.example"].host, routes["b.example"].port, routes["b.example"].tls) == ("127.0.0.1", 2526,
                                                                                             TlsMode.NONE)
    assert (routes["c.example"].host, routes["c.example"].port, routes["c.example"].tls) == ("::1", 25,
                                                                                             TlsMode.STARTTLS)
    assert routes["d.example"].tls is TlsMode.IMPLICIT
    assert parse_routes(None) == {} and parse_routes("") == {}


@pytest.mark.parametrize("spec", ["b.example", "b.example=", "=host:25", "b.example=host:0", "b.example=host:99999",
                                  "b.example=host:25/ssl", "b example=host", "b.example=host;rm -rf"])
def test_bad_routes_are_invalid(spec):
    with pytest.raises(ServerError) as err:
        parse_routes(spec)
    assert err.value.kind is ErrorKind.INVALID


def test_relay_with_credentials_needs_tls():
    cfg = relay_config(Settings(relay_host="smtp.example", relay_port=587, relay_tls="implicit",
                                relay_username="u", relay_password="p"))
    assert cfg.smarthost.tls is TlsMode.IMPLICIT and cfg.smarthost.username == "u"
    with pytest.raises(ValueError):
        relay_config(Settings(relay_host="smtp.example", relay_tls="none", relay_username="u", relay_password="p"))


@pytest.fixture
def sites():
    key = generate_key("<a@a.example>", bits=2048)
    return Sites([Site("site-a", "a@a.example", key)])


@pytest.mark.parametrize("uid, address", [("Klinik A <DICOM@A.example>", "dicom@a.example"),
                                          ("dicom@b.example", "dicom@b.example"), ("Klinik ohne Adresse", None)])
def test_address_of_a_user_id(uid, address):
    assert address_of(uid) == address


def test_sites_by_address_any_spelling_and_no_shared_address(sites):
    key = sites.of_tenant("site-a").key
    assert sites.by_address("mailto:A@A.example").tenant == "site-a"
    assert sites.by_address("<a@a.example>").tenant == "site-a" and sites.by_address("x@a.example") is None
    assert normalize_address(" <Mailto:A@A.Example> ") == "a@a.example"
    with pytest.raises(ServerError) as err:
        sites.of_tenant("site-b")
    assert err.value.kind is ErrorKind.INVALID and "keys init" in err.value.message
    with pytest.raises(ServerError):
        Sites([Site("site-a", "a@a.example", key), Site("site-b", "a@a.example", key)])


def test_mailboxes_file(tmp_path, sites):
    secret = tmp_path / "pw"
    secret.write_text("geheim\n")
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps([{"tenant": "site-a", "protocol": "imap", "host": "imap.example", "port": 993,
                                 "username": "a", "password_file": str(secret), "tls": "implicit"}]))
    [box] = load_mailboxes(path, sites)
    assert box.tenant == "site-a" and box.config.protocol is Protocol.IMAP and box.config.password == "geheim"
    assert box.config.tls is TlsMode.IMPLICIT and box.config.name == "site-a-1"
    assert load_mailboxes(None, sites) == []


@pytest.mark.parametrize("content", [
    "not json", '{"tenant": "site-a"}', '[42]', '[{"protocol": "pop3"}]',
    '[{"tenant": "site-x", "protocol": "pop3", "host": "h", "port": 110, "username": "u", "password": "p"}]',
    '[{"tenant": "site-a", "protocol": "smtp", "host": "h", "port": 110, "username": "u", "password": "p"}]',
    '[{"tenant": "site-a", "protocol": "pop3", "host": "h", "port": 110, "username": "u", "password": "p", '
    '"after": "move"}]',
    '[{"tenant": "site-a", "protocol": "pop3", "host": "h", "port": 110, "username": "u", "password": "p", '
    '"colour": "blue"}]',
    '[{"tenant": "site-a", "protocol": "pop3", "host": "h", "port": 110}]',
])
def test_bad_mailboxes_files_are_invalid(tmp_path, sites, content):
    path = tmp_path / "boxes.json"
    path.write_text(content)
    with pytest.raises(ServerError) as err:
        load_mailboxes(path, sites)
    assert err.value.kind is ErrorKind.INVALID


def test_missing_mailboxes_file_is_invalid(tmp_path, sites):
    with pytest.raises(ServerError) as err:
        load_mailboxes(tmp_path / "nope.json", sites)
    assert err.value.kind is ErrorKind.INVALID


def test_unreadable_password_file_is_invalid(tmp_path, sites):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps([{"tenant": "site-a", "protocol": "pop3", "host": "h", "port": 110, "username": "u",
                                 "password_file": str(tmp_path / "missing")}]))
    with pytest.raises(ServerError) as err:
        load_mailboxes(path, sites)
    assert err.value.kind is ErrorKind.INVALID and "password_file" in err.value.message
