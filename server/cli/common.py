"""What the API client commands share: the client a command's options name, and how a result is printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError


def api_options(p):
    """The options every API client command takes: where the server is, the token, JSON output."""
    p.add_argument("--server", default=os.environ.get("TINYMLAAS_SERVER", "http://127.0.0.1:8080"),
                   help="server URL (env TINYMLAAS_SERVER)")
    p.add_argument("--token", help="API token (env TINYMLAAS_TOKEN; default: DATA/admin.token)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def api_client(args):
    from server.client import Client

    token = args.token or os.environ.get("TINYMLAAS_TOKEN")
    if not token:
        path = Path(os.environ.get("TINYMLAAS_DATA", "instance")) / "admin.token"
        if path.exists():
            token = path.read_text().strip()
    if not token:
        raise TinyMLaaSError("an API token is needed: --token, TINYMLAAS_TOKEN, or DATA/admin.token")
    return Client(args.server, token)


def output(obj, as_json: bool, fmt) -> None:
    """`obj` as JSON (--json), else as `fmt` words it for a person."""
    print(json.dumps(obj, indent=2) if as_json else fmt(obj))
