"""Users and API tokens of the caller's organisation."""

from .. import db
from ..services.common import ServiceError, of_org
from ..services.tenants import create_user, issue_token, revoke_token, tokens_visible_to
from . import require, schemas, session
from .blueprint import Blueprint
from .schemas import DEFAULT_TOKEN_DAYS

blp = Blueprint("tenants", __name__, description="Users, roles and API tokens of your organisation")


def _with_secret(row, token: str) -> dict:
    """A row's columns (the response schema picks what is shown) plus the token, shown this once."""
    return {**{c.name: getattr(row, c.name) for c in row.__table__.columns}, "token": token}


@blp.route("/me", methods=["GET"])
@blp.response(200, schemas.Me)
def me():
    """Who this token acts as, in which organisation, with which scopes."""
    who = require()
    org = session().get(db.Organization, who.org_id)
    return {"user": who.user.name, "organization": org.name, "role": who.user.role, "scopes": sorted(who.scopes),
            "token": who.token.name}


@blp.route("/users", methods=["POST"])
@blp.arguments(schemas.UserCreate)
@blp.response(201, schemas.UserCreated)
def create(body):
    """Add a user to your organisation (admin); the answer holds its first token, shown once."""
    who = require("admin")
    org = session().get(db.Organization, who.org_id)
    user, token = create_user(session(), body["name"], org, body["role"], token_days=90)
    return _with_secret(user, token)


@blp.route("/users", methods=["GET"])
@blp.response(200, schemas.User(many=True))
def list_users():
    who = require()
    return session().scalars(of_org(who, db.User)).all()


@blp.route("/tokens", methods=["POST"])
@blp.arguments(schemas.TokenCreate)
@blp.response(201, schemas.TokenCreated)
def create_token(body):
    """A new token for yourself, with some or all of this token's scopes, ending at the latest with it (default 90
    days, or this token's end if sooner); revoking this token revokes it."""
    who = require()
    scopes = body["scopes"] or sorted(who.scopes)
    beyond = sorted(set(scopes) - who.scopes)
    if beyond:  # a token never mints a stronger one
        raise ServiceError(403, f"this token does not hold {', '.join(beyond)}; a new token gets at most its scopes",
                           "scopes")
    given = "expires_in_days" in body
    row, token = issue_token(session(), who.user, body["name"], scopes,
                             body["expires_in_days"] if given else DEFAULT_TOKEN_DAYS, parent=who.token,
                             default_days=not given)
    return _with_secret(row, token)


@blp.route("/tokens", methods=["GET"])
@blp.response(200, schemas.Token(many=True))
def list_tokens():
    """Your tokens (an admin: the organisation's), never their secrets."""
    return tokens_visible_to(session(), require())


@blp.route("/tokens/<int:token_id>", methods=["DELETE"])
@blp.response(200, schemas.Token)
def revoke(token_id):
    """Revoke a token (yours; an admin: any of the organisation's); it fails from the next request on."""
    return revoke_token(session(), require(), token_id)
