"""What every resource's service shares: the refusal, who a request acts as, tenant isolation, name rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from tinymlaas.errors import UnknownTarget
from tinymlaas.targets import get_target

from ..db import ROLES, ApiToken, User

# names are checked whole (fullmatch: "$" lets a newline in); the API's schemas use the same rules
DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
DEVICE_ID_RULE = "lower-case letters, digits, '-' and '_', at most 64, starting with a letter or digit"
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
TOKEN_NAME_RULE = "a token name: letters, digits, ' ', '.', '_', '-', at most 64"
USER_NAME = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
USER_NAME_RULE = "a user name: lower-case letters, digits, '.', '_', '-', '@', at most 64"
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no NUL, '/', '+', '#': MQTT's separators and wildcards
GROUP_NAME_RULE = "a group name: letters, digits, '.', '_', '-', at most 64, starting with a letter or digit"


class ServiceError(Exception):
    """A request the server refuses: HTTP status, the field at fault (if any), and why."""

    def __init__(self, status: int, message: str, field: str | None = None):
        self.status, self.field = status, field
        super().__init__(message)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the user, its organisation, and the scopes its token grants within the user's role."""

    user: User
    token: ApiToken
    scopes: frozenset

    @property
    def org_id(self) -> int:
        return self.user.org_id

    def need(self, scope: str) -> None:
        if scope == "read" and self.scopes:  # any scope reads what it acts on (a build token its builds)
            return
        if scope not in self.scopes:
            why = (f"your role ({self.user.role}) does not allow it" if scope not in ROLES[self.user.role]
                   else f"this token ('{self.token.name}') is limited to {', '.join(sorted(self.token.scopes))}")
            raise ServiceError(403, f"this needs the '{scope}' scope: {why}", "Authorization")


def of_org(who: Principal, *what, order=None) -> Select:
    """SELECT `what` (a table's entity or its columns) of `who`'s organisation, by `order` (default: the id): every
    listing, the API's and the dashboard's, starts here."""
    table = what[0] if isinstance(what[0], type) else what[0].class_
    return select(*what).where(table.org_id == who.org_id).order_by(order if order is not None else table.id)


def owned(session: Session, who: Principal, model, key):
    """The row of `who`'s organisation with this key, or None: another tenant's rows do not exist for it."""
    row = session.get(model, key)
    return row if row is not None and row.org_id == who.org_id else None


def target_or_422(name: str):
    """The target of this name; an unknown one is the request's fault (422 on `target`), not the server's."""
    try:
        return get_target(name)
    except UnknownTarget as e:
        raise ServiceError(422, str(e), "target") from None
