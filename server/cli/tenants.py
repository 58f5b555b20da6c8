"""Tenants: `tinymlaas orgs` (an operator's, on the server's database), `whoami`, `users` and `tokens`."""

from __future__ import annotations

import os
from pathlib import Path

from tinymlaas.errors import TinyMLaaSError

from .common import api_client, api_options, output


def cmd_orgs_create(args) -> int:
    """An operator's command (it opens the server's database): a new tenant and its first admin."""
    from server.config import Settings
    from server.db import make_engine, make_sessionmaker, upgrade
    from server.services.common import ServiceError
    from server.services.tenants import create_organization, create_user

    settings = Settings(data_dir=Path(args.data))
    upgrade(settings.database_url)
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        try:
            user, token = create_user(session, args.admin, create_organization(session, args.name),
                                      token_days=args.expires_in_days)
        except ServiceError as e:
            raise TinyMLaaSError(f"{e.field}: {e}" if e.field else str(e)) from None
    output({"organization": args.name, "admin": user.name, "token": token}, args.json,
           lambda d: f"organisation {d['organization']}: admin {d['admin']}, token {d['token']} (shown once)")
    return 0


def cmd_whoami(args) -> int:
    output(api_client(args).me(), args.json, lambda d: f"{d['user']} ({d['role']}) in {d['organization']}; token "
           f"'{d['token']}' may {', '.join(d['scopes'])}")
    return 0


def cmd_users_create(args) -> int:
    u = api_client(args).create_user(args.name, args.role)
    output(u, args.json, lambda u: f"user {u['name']} ({u['role']}); token {u['token']} (shown once, 90 days)")
    return 0


def cmd_users_list(args) -> int:
    output(api_client(args).users(), args.json,
           lambda rows: "\n".join([f"{'id':>4} {'user':<24} role"] + [f"{u['id']:>4} {u['name']:<24} {u['role']}"
                                                                        for u in rows]))
    return 0


def cmd_tokens_create(args) -> int:
    scopes = args.scopes.split(",") if args.scopes else None
    days = None if args.expires_in_days == 0 else args.expires_in_days
    t = api_client(args).create_token(args.name, scopes, days)
    output(t, args.json, lambda t: f"token {t['id']} '{t['name']}' ({', '.join(t['scopes'])}; "
           f"{'expires ' + t['expires_at'][:10] if t['expires_at'] else 'no expiry'}): {t['token']} (shown once)")
    return 0


def cmd_tokens_list(args) -> int:
    def fmt(rows):
        out = [f"{'id':>4} {'name':<20} {'user':>4} {'scopes':<26} {'expires':<10} {'last used':<16} state"]
        for t in rows:
            state = "revoked" if t["revoked_at"] else "active"
            out.append(f"{t['id']:>4} {t['name']:<20} {t['user_id']:>4} {','.join(t['scopes']):<26} "
                       f"{(t['expires_at'] or 'never')[:10]:<10} {(t['last_used_at'] or '-')[:16]:<16} {state}")
        return "\n".join(out)
    output(api_client(args).tokens(), args.json, fmt)
    return 0


def cmd_tokens_revoke(args) -> int:
    t = api_client(args).revoke_token(args.id)
    output(t, args.json, lambda t: f"token {t['id']} '{t['name']}' revoked")
    return 0


def register(sub) -> None:
    orgs = sub.add_parser("orgs", help="organisations (tenants): an operator's commands on the server's data folder")
    orgs = orgs.add_subparsers(dest="what", required=True)
    p = orgs.add_parser("create", help="a new organisation and its first admin; prints the admin's token once")
    p.add_argument("name")
    p.add_argument("--admin", required=True, help="the admin's user name")
    p.add_argument("--expires-in-days", type=int, default=None, help="the admin token's lifetime (default: none)")
    p.add_argument("--data", default=os.environ.get("TINYMLAAS_DATA", "instance"), help="the server's data folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_orgs_create)

    p = api_options(sub.add_parser("whoami", help="who the token acts as: user, organisation, role, scopes"))
    p.set_defaults(func=cmd_whoami)

    users = sub.add_parser("users", help="users of your organisation").add_subparsers(dest="what", required=True)
    p = api_options(users.add_parser("create", help="add a user (admin); prints its first token once"))
    p.add_argument("name")
    p.add_argument("--role", choices=("admin", "developer", "viewer"), default="developer")
    p.set_defaults(func=cmd_users_create)
    p = api_options(users.add_parser("list", help="list the organisation's users"))
    p.set_defaults(func=cmd_users_list)

    tokens = sub.add_parser("tokens", help="API tokens").add_subparsers(dest="what", required=True)
    p = api_options(tokens.add_parser("create", help="a new token for yourself; printed once"))
    p.add_argument("name")
    p.add_argument("--scopes", help="comma-separated: read,build,deploy,admin (default: all of this token's)")
    p.add_argument("--expires-in-days", type=int, default=90, help="lifetime in days (default 90; 0: until revoked)")
    p.set_defaults(func=cmd_tokens_create)
    p = api_options(tokens.add_parser("list", help="your tokens (an admin: the organisation's)"))
    p.set_defaults(func=cmd_tokens_list)
    p = api_options(tokens.add_parser("revoke", help="revoke a token by id"))
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_tokens_revoke)
