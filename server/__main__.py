"""The ``telerad`` command line: serve, token, openapi."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.config import load_settings
from server.errors import ServerError

DEFAULT_READ_WRITE = "system/*.cruds"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app, prepare

    settings = load_settings(data_dir=args.data_dir, host=args.host, port=args.port, workers=args.workers)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                    proxy_headers=False)
        return 0
    prepare(settings)
    # Worker processes build their settings from the environment: hand the effective values down.
    os.environ["TELERAD_DATA_DIR"] = str(settings.data_dir.resolve())
    os.environ["TELERAD_DATABASE_URL"] = settings.resolved_database_url
    uvicorn.run("server.app:worker_app", factory=True, workers=settings.workers, host=settings.host,
                port=settings.port, log_level=settings.log_level, proxy_headers=False)
    return 0


def _token(args: argparse.Namespace) -> int:
    from server.security.tokens import issue, load_or_create_key

    settings = load_settings(data_dir=args.data_dir)
    key = load_or_create_key(settings.data_dir)
    ttl = args.ttl if args.ttl is not None else settings.token_ttl_seconds
    print(issue(key, tenant=args.tenant, scope=args.scope, subject=args.subject, ttl_seconds=ttl))
    return 0


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
