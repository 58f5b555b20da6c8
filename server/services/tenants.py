"""Organisations (tenants), their users and API tokens, and who a bearer token stands for."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..db import ROLES, SCOPES, ApiToken, Organization, User, now
from .common import TOKEN_NAME, TOKEN_NAME_RULE, USER_NAME, USER_NAME_RULE, Principal, ServiceError


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_organization(session: Session, name: str) -> Organization:
    if not USER_NAME.fullmatch(name or ""):
        raise ServiceError(422, "an organisation name: lower-case letters, digits, '.', '_', '-', '@', at most 64",
                           "name")
    if session.scalar(select(Organization).where(Organization.name == name)):
        raise ServiceError(409, f"organisation '{name}' exists", "name")
    org = Organization(name=name)
    session.add(org)
    session.flush()
    return org


def create_user(session: Session, name: str, org: Organization | None = None, role: str = "admin",
                token_days: int | None = None) -> tuple[User, str]:
    """A user and its first token (all of its role's scopes). No `org`: a new organisation of the same name,
    whose admin the user is (how the service's first user, and each new tenant, starts)."""
    if not USER_NAME.fullmatch(name or ""):
        raise ServiceError(422, USER_NAME_RULE, "name")
    if role not in ROLES:
        raise ServiceError(422, f"role must be one of {', '.join(ROLES)}, not '{str(role)[:20]}'", "role")
    if org is None:
        org = create_organization(session, name)
    if session.scalar(select(User).where(User.org_id == org.id, User.name == name)):  # names are per organisation
        raise ServiceError(409, f"user '{name}' exists", "name")
    user = User(name=name, org_id=org.id, role=role)
    session.add(user)
    session.flush()
    _, token = issue_token(session, user, "initial", ROLES[role], token_days)
    return user, token


def issue_token(session: Session, user: User, name: str, scopes, days: int | None, parent: ApiToken | None = None,
                default_days: bool = False) -> tuple[ApiToken, str]:
    """A new token of `user` (shown once; only its hash is kept), valid for `days` (None: until revoked). Made by
    the token `parent`: never beyond its end (403 where `days` asks for more; the default is cut to it), and
    revoked with it."""
    if not TOKEN_NAME.fullmatch(name or ""):
        raise ServiceError(422, TOKEN_NAME_RULE, "name")
    unknown = [x for x in scopes if x not in SCOPES]
    if unknown or not scopes:
        raise ServiceError(422, f"scopes: one or more of {', '.join(SCOPES)} (not {', '.join(map(str, unknown))})"
                           if unknown else f"scopes: one or more of {', '.join(SCOPES)}", "scopes")
    beyond = sorted(set(scopes) - set(ROLES[user.role]))
    if beyond:
        raise ServiceError(403, f"a {user.role} cannot hold the scope(s) {', '.join(beyond)}", "scopes")
    if days is not None and not 1 <= days <= 3650:
        raise ServiceError(422, "expires_in_days: 1 to 3650 (or none: until revoked)", "expires_in_days")
    expires = None if days is None else now() + dt.timedelta(days=days)
    if parent is not None and parent.expires_at is not None and (expires is None or expires > parent.expires_at):
        if not default_days:
            raise ServiceError(403, f"a token cannot outlive the token that creates it, which expires on "
                               f"{parent.expires_at:%Y-%m-%d %H:%M} UTC", "expires_in_days")
        expires = parent.expires_at
    token = "tmk_" + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_hash=token_hash(token),
                   scopes=[x for x in SCOPES if x in scopes], expires_at=expires,
                   parent_id=parent.id if parent is not None else None)
    session.add(row)
    session.commit()
    return row, token


def principal_for_token(session: Session, token: str) -> Principal:
    """The principal a bearer token stands for; 401 naming why when none (unknown, expired, revoked)."""
    return principal_for_hash(session, token_hash(token) if token else "")


def principal_for_hash(session: Session, digest: str) -> Principal:
    """The principal of the token with this hash (the dashboard's session keeps the hash, never the token)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest)) if digest else None
    if row is None:
        raise ServiceError(401, "a valid API token is needed: 'Authorization: Bearer <token>'", "Authorization")
    if row.revoked_at is not None:
        raise ServiceError(401, f"this token ('{row.name}') was revoked", "Authorization")
    t = now()
    if row.expires_at is not None and row.expires_at <= t:
        raise ServiceError(401, f"this token ('{row.name}') expired on {row.expires_at:%Y-%m-%d %H:%M} UTC",
                           "Authorization")
    user = session.get(User, row.user_id)
    if row.last_used_at is None or (t - row.last_used_at).total_seconds() > 60:  # not a write per request
        row.last_used_at = t
        session.commit()
    return Principal(user, row, frozenset(row.scopes) & frozenset(ROLES[user.role]))


def tokens_visible_to(session: Session, who: Principal) -> list[ApiToken]:
    """One's own tokens; an admin sees every token of the organisation."""
    q = select(ApiToken).join(User, User.id == ApiToken.user_id).where(User.org_id == who.org_id)
    if "admin" not in who.scopes:
        q = q.where(ApiToken.user_id == who.user.id)
    return list(session.scalars(q.order_by(ApiToken.id)))


def revoke_token(session: Session, who: Principal, token_id: int) -> ApiToken:
    """Revoke a token and every token it created, theirs in turn. A token may revoke itself; another only with a
    scope beyond read and every scope the other holds (a read-only token revoked full-access ones)."""
    row = next((t for t in tokens_visible_to(session, who) if t.id == token_id), None)
    if row is None:
        raise ServiceError(404, f"no token {token_id}")
    if row.id != who.token.id:
        stronger = sorted(set(row.scopes) - who.scopes)
        if who.scopes <= {"read"} or stronger:
            what = f"the scope(s) {', '.join(stronger)} it holds" if stronger else "a scope beyond read"
            raise ServiceError(403, f"revoking token {token_id} needs {what}", "Authorization")
    t, ends = now(), [row]
    while ends:
        for end in ends:
            if end.revoked_at is None:
                end.revoked_at = t
        ends = list(session.scalars(select(ApiToken).where(ApiToken.parent_id.in_([e.id for e in ends]))))
    session.commit()
    return row
