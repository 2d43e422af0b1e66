"""The ``telerad`` command line: serve, token, client, keys, directory, openapi."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.config import load_settings
from server.errors import ErrorKind, ServerError

DEFAULT_READ_WRITE = "system/*.cruds"
DEFAULT_SMTP_PORT = 2525


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app, prepare

    settings = load_settings(data_dir=args.data_dir, host=args.host, port=args.port, workers=args.workers,
                             smtp_port=args.smtp_port)
    if args.no_smtp or settings.smtp_port is None:
        settings = settings.model_copy(update={"smtp_port": None if args.no_smtp else DEFAULT_SMTP_PORT})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                    proxy_headers=False)
        return 0
    prepare(settings)
    # Worker processes build their settings from the environment: hand the effective values down. They serve
    # HTTP only; this supervising process runs the one gateway of the data folder (SMTP ingress, sender).
    os.environ["TELERAD_DATA_DIR"] = str(settings.data_dir.resolve())
    os.environ["TELERAD_DATABASE_URL"] = settings.resolved_database_url
    os.environ["TELERAD_GATEWAY_WORKER"] = "false"
    gateway = None
    if settings.gateway_worker:
        gateway = _supervisor_gateway(settings)
        gateway.start_in_thread()
    try:
        uvicorn.run("server.app:worker_app", factory=True, workers=settings.workers, host=settings.host,
                    port=settings.port, log_level=settings.log_level, proxy_headers=False)
    finally:
        if gateway is not None:
            gateway.stop_thread()
    return 0


def _supervisor_gateway(settings):
    """The gateway of ``serve --workers N``, on its own engine and services."""
    from server.fhir.setup import build_service
    from server.gateway.runtime import Gateway
    from server.gateway.tasks import task_hook
    from server.store.archive import Archive
    from server.store.blobs import BlobStore
    from server.store.db import make_engine

    engine = make_engine(settings.resolved_database_url)
    fhir = build_service(settings, engine)
    return Gateway(settings, engine, BlobStore(settings.data_dir, fsync=settings.fsync), Archive(engine), fhir,
                   also=task_hook(fhir, "/fhir"))


def _token(args: argparse.Namespace) -> int:
    from server.security.tokens import issue, load_or_create_key

    settings = load_settings(data_dir=args.data_dir)
    key = load_or_create_key(settings.data_dir)
    ttl = args.ttl if args.ttl is not None else settings.token_ttl_seconds
    print(issue(key, tenant=args.tenant, scope=args.scope, subject=args.subject, ttl_seconds=ttl))
    return 0


def _client_store(args: argparse.Namespace):
    """The client registry of the data folder's database (migrated first, so it works before ``serve``)."""
    from server.store.clients import ClientStore
    from server.store.db import make_engine
    from server.store.migrate import upgrade

    settings = load_settings(data_dir=args.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    return ClientStore(engine)


def _client_add(args: argparse.Namespace) -> int:
    from server.security.oauth import (RegisteredClient, hash_secret, new_client_id, new_secret, parse_jwks,
                                       validate_client_id, validate_registration)

    tenant, scope = validate_registration(args.tenant, args.scope)
    client_id = validate_client_id(args.client_id) if args.client_id else new_client_id()
    secret = jwks = None
    if args.jwks_file is not None:
        try:
            text = args.jwks_file.read_text()
        except OSError as exc:
            raise ServerError(ErrorKind.INVALID, f"cannot read {args.jwks_file}: {exc.strerror}") from exc
        jwks = parse_jwks(text)
    else:
        secret = new_secret()
    store = _client_store(args)
    try:
        store.add(RegisteredClient(client_id=client_id, tenant=tenant, scope=scope,
                                   secret_hash=hash_secret(secret) if secret else None, jwks=jwks))
    finally:
        store.engine.dispose()
    print(f"client_id: {client_id}")
    if secret:
        print(f"client_secret: {secret}")
        print("(the secret is shown once; only its hash is stored)", file=sys.stderr)
    return 0


def _client_list(args: argparse.Namespace) -> int:
    store = _client_store(args)
    try:
        clients = store.list(args.tenant)
    finally:
        store.engine.dispose()
    for c in clients:
        print(f"{c.client_id}\t{c.tenant}\t{c.auth_method}\t{c.created}\t{c.scope}")
    return 0


def _client_remove(args: argparse.Namespace) -> int:
    store = _client_store(args)
    try:
        removed = store.remove(args.client_id)
    finally:
        store.engine.dispose()
    if not removed:
        raise ServerError(ErrorKind.NOT_FOUND, f"no client {args.client_id!r}")
    print(f"removed {args.client_id}")
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    from server.gateway.keys import init_key

    settings = load_settings(data_dir=args.data_dir)
    key = init_key(settings.data_dir, args.tenant, args.address, name=args.name, bits=args.bits, force=args.force)
    print(key.fingerprint)
    return 0


def _keys_export(args: argparse.Namespace) -> int:
    from server.gateway.keys import public_key_text

    settings = load_settings(data_dir=args.data_dir)
    sys.stdout.write(public_key_text(settings.data_dir, args.tenant))
    return 0


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise ServerError(ErrorKind.INVALID, f"cannot read {what} {path}: {exc.strerror}") from exc


def _keys_import(args: argparse.Namespace) -> int:
    from server.gateway.keys import import_key

    settings = load_settings(data_dir=args.data_dir)
    passphrase = None
    if args.passphrase_file is not None:
        passphrase = _read_bytes(args.passphrase_file, "passphrase file").rstrip(b"\r\n")
    key = import_key(settings.data_dir, args.tenant, _read_bytes(args.file, "key file"), passphrase=passphrase,
                     force=args.force)
    print(key.fingerprint)
    return 0


def _directory_import(args: argparse.Namespace) -> int:
    from server.fhir.setup import build_service
    from server.gateway.directory import import_file
    from server.store.db import make_engine
    from server.store.migrate import upgrade

    settings = load_settings(data_dir=args.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
        report = import_file(build_service(settings, engine), args.tenant, args.file, partial=args.partial)
    finally:
        engine.dispose()
    for error in report.errors:
        print(f"{args.file}:{error.line}: {error.message}", file=sys.stderr)
    print(f"created: {report.created}, updated: {report.updated}, failed rows: {len(report.errors)}")
    return 1 if report.errors else 0


def _openapi(args: argparse.Namespace) -> int:
    import tempfile

    from server.app import create_app
    from server.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=Path(tmp)))
        text = json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``telerad``."""
    parser = argparse.ArgumentParser(prog="telerad", description="telerad-bridge gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (DICOMweb under /dicomweb)")
    serve.add_argument("--data-dir", type=Path, default=None, help="folder for index, blobs and keys (default ./data)")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080)")
    serve.add_argument("--smtp-port", type=int, default=None,
                       help=f"SMTP ingress port for DICOM e-mail (default {DEFAULT_SMTP_PORT}, or TELERAD_SMTP_PORT)")
    serve.add_argument("--no-smtp", action="store_true", help="no SMTP ingress (mailbox polls and sending go on)")
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes sharing the port (default 1; e.g. the number of cores)")
    serve.set_defaults(func=_serve)
    token = sub.add_parser("token", help="print a bearer token the server in DATA_DIR accepts")
    token.add_argument("--data-dir", type=Path, default=None)
    token.add_argument("--tenant", default="default")
    token.add_argument("--scope", default=DEFAULT_READ_WRITE,
                       help='space separated SMART v2 scopes, e.g. "system/*.rs" (read) or "system/*.cruds"')
    token.add_argument("--subject", default="admin")
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")
    token.set_defaults(func=_token)
    client = sub.add_parser("client", help="register OAuth clients of the token endpoint /auth/token")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    add = client_sub.add_parser("add", help="register a client (SMART Backend Services, client_credentials)")
    add.add_argument("--data-dir", type=Path, default=None)
    add.add_argument("--tenant", required=True, help="the tenant every token of this client acts for")
    add.add_argument("--scope", required=True,
                     help='space separated SMART v2 system scopes the client may request, e.g. "system/*.rs"')
    cred = add.add_mutually_exclusive_group(required=True)
    cred.add_argument("--jwks-file", type=Path, default=None,
                      help="JWK Set (or one JWK) of the client's public RS384/ES384 keys (private_key_jwt)")
    cred.add_argument("--secret", action="store_true",
                      help="generate a client secret (printed once; client_secret_basic/client_secret_post)")
    add.add_argument("--client-id", default=None, help="the client id (default: random)")
    add.set_defaults(func=_client_add)
    lst = client_sub.add_parser("list", help="list the registered clients (id, tenant, method, created, scopes)")
    lst.add_argument("--data-dir", type=Path, default=None)
    lst.add_argument("--tenant", default=None)
    lst.set_defaults(func=_client_list)
    rm = client_sub.add_parser("remove", help="remove a client (its tokens stay valid until they expire)")
    rm.add_argument("client_id")
    rm.add_argument("--data-dir", type=Path, default=None)
    rm.set_defaults(func=_client_remove)
    keys = sub.add_parser("keys", help="the OpenPGP key pair of a tenant (DATA_DIR/keys/<tenant>/)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kinit = keys_sub.add_parser("init", help="generate the tenant's RSA key pair and print its fingerprint")
    kinit.add_argument("--data-dir", type=Path, default=None)
    kinit.add_argument("--tenant", required=True)
    kinit.add_argument("--address", required=True, help="the site's DICOM e-mail address (in the User ID)")
    kinit.add_argument("--name", default=None, help='the name in the User ID, e.g. "Klinikum Bremen-Mitte"')
    kinit.add_argument("--bits", type=int, choices=(3072, 4096), default=3072)
    kinit.add_argument("--force", action="store_true", help="replace an existing key")
    kinit.set_defaults(func=_keys_init)
    kexp = keys_sub.add_parser("export", help="print the tenant's armored public key")
    kexp.add_argument("--data-dir", type=Path, default=None)
    kexp.add_argument("--tenant", required=True)
    kexp.set_defaults(func=_keys_export)
    kimp = keys_sub.add_parser("import", help="import an existing secret key (e.g. gpg --export-secret-keys)")
    kimp.add_argument("file", type=Path, help="armored or binary secret key ('-' for stdin)")
    kimp.add_argument("--data-dir", type=Path, default=None)
    kimp.add_argument("--tenant", required=True)
    kimp.add_argument("--passphrase-file", type=Path, default=None,
                      help="file holding the passphrase of a protected key (first line)")
    kimp.add_argument("--force", action="store_true", help="replace an existing key")
    kimp.set_defaults(func=_keys_import)
    directory = sub.add_parser("directory", help="the network directory (Organization, HealthcareService, Endpoint)")
    dir_sub = directory.add_subparsers(dest="directory_command", required=True)
    dimp = dir_sub.add_parser("import", help="import a FHIR Bundle (.json) or the operator's site list (.csv)")
    dimp.add_argument("file", type=Path)
    dimp.add_argument("--data-dir", type=Path, default=None)
    dimp.add_argument("--tenant", required=True)
    dimp.add_argument("--partial", action="store_true", help="import the good rows of a CSV even when others fail")
    dimp.set_defaults(func=_directory_import)
    openapi = sub.add_parser("openapi", help="write the OpenAPI document")
    openapi.add_argument("--output", default="openapi/openapi.json")
    openapi.set_defaults(func=_openapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``telerad`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ServerError as exc:
        print(f"telerad: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
