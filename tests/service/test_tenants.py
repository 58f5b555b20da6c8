"""Tenancy through the real app and database: organisations see nothing of each other, roles and token scopes limit
what a request may do, tokens expire and are revoked, old databases migrate with their tokens working."""

import datetime as dt
import io

import pytest

from server.broker import check_secret
from server.config import Settings
from server.db import ApiToken, Device, User, alembic_config
from server.runtime import DeviceAuthority
from server.services.tenants import create_organization, create_user
from tests.helpers.api import done_build


@pytest.fixture
def app(tmp_path, database_url, make_app):
    app = make_app(Settings(data_dir=tmp_path / "data", database_url=database_url))
    with app.extensions["tinymlaas"].sessions() as s:
        _, app.alice = create_user(s, "alice", create_organization(s, "acme"))
        _, app.bob = create_user(s, "bob", create_organization(s, "globex"))
    return app


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def problem(r, status: int, words: str, field: str | None = None):
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert words.lower() in body["detail"].lower(), body
    if field:
        assert body["field"] == field, body


def test_an_organisation_sees_and_touches_nothing_of_another(app):
    c = app.test_client()
    build_id, model = done_build(app, c, auth(app.alice), "lab")
    dep = c.post("/api/v1/deployments", json={"build_id": build_id, "group": "lab"}, headers=auth(app.alice))
    assert dep.status_code == 201
    dep_id = dep.get_json()["id"]
    bob = auth(app.bob)
    # lists are empty, ids do not exist
    for path in ("devices", "models", "builds", "deployments"):
        assert c.get(f"/api/v1/{path}", headers=bob).get_json() == [], path
    for path in ("devices/lab-dev", f"models/{model['id']}", f"builds/{build_id}", f"deployments/{dep_id}",
                 f"builds/{build_id}/artifacts/report"):
        problem(c.get(f"/api/v1/{path}", headers=bob), 404, "no ")
    problem(c.get(f"/api/v1/artifacts/{model['sha256']}", headers=bob), 404, "no artifact")
    assert c.get(f"/api/v1/artifacts/{model['sha256']}", headers=auth(app.alice)).status_code == 200
    # nor can it act on them
    problem(c.post("/api/v1/builds", json={"model_id": model["id"], "target": "cortex-m4"}, headers=bob), 422,
            f"no model {model['id']}", "model_id")
    problem(c.post("/api/v1/deployments", json={"build_id": build_id, "group": "lab"}, headers=bob), 422,
            f"no build {build_id}", "build_id")
    for path in (f"builds/{build_id}/cancel", f"deployments/{dep_id}/cancel", f"deployments/{dep_id}/rollback",
                 "devices/lab-dev/credentials"):
        problem(c.post(f"/api/v1/{path}", headers=bob), 404, "no ")
    # the same group name in two organisations is two groups: bob's rollout starts beside alice's, to his device only
    bob_build, _ = done_build(app, c, auth(app.bob), "other")
    assert c.post("/api/v1/devices", json={"id": "bob-lab-1", "target": "cortex-m4", "group": "lab"},
                  headers=bob).status_code == 201
    r = c.post("/api/v1/deployments", json={"build_id": bob_build, "group": "lab"}, headers=bob)
    assert r.status_code == 201, r.get_json()
    jobs = c.get(f"/api/v1/deployments/{r.get_json()['id']}", headers=bob).get_json()["jobs"]
    assert [j["device_id"] for j in jobs] == ["bob-lab-1"]
    alice_jobs = c.get(f"/api/v1/deployments/{dep_id}", headers=auth(app.alice)).get_json()["jobs"]
    assert [j["device_id"] for j in alice_jobs] == ["lab-dev"]
    # a name alice uses is bob's to take too (409 would tell him it exists), and his is another device
    mine = c.post("/api/v1/devices", json={"id": "lab-dev", "target": "cortex-m4"}, headers=bob)
    assert mine.status_code == 201, mine.get_json()
    assert c.get(f"/api/v1/deployments/{dep_id}", headers=auth(app.alice)).get_json()["jobs"] == alice_jobs


def test_roles_limit_what_a_user_may_do(app):
    c = app.test_client()
    r = c.post("/api/v1/users", json={"name": "vic", "role": "viewer"}, headers=auth(app.alice))
    assert r.status_code == 201 and r.get_json()["role"] == "viewer"
    viewer = auth(r.get_json()["token"])
    dev = c.post("/api/v1/users", json={"name": "dora", "role": "developer"}, headers=auth(app.alice)).get_json()
    developer = auth(dev["token"])
    assert c.get("/api/v1/devices", headers=viewer).status_code == 200
    problem(c.post("/api/v1/devices", json={"id": "v-1", "target": "cortex-m4"}, headers=viewer), 403,
            "needs the 'deploy' scope: your role (viewer)", "Authorization")
    problem(c.post("/api/v1/models", data={"file": (io.BytesIO(b"x"), "m.tflite")}, headers=viewer), 403,
            "'build' scope")
    assert c.post("/api/v1/devices", json={"id": "d-1", "target": "cortex-m4"}, headers=developer).status_code == 201
    problem(c.post("/api/v1/users", json={"name": "eve", "role": "admin"}, headers=developer), 403, "'admin' scope")
    # an admin adds users to its own organisation only
    assert [u["name"] for u in c.get("/api/v1/users", headers=auth(app.bob)).get_json()] == ["bob"]
    assert [u["name"] for u in c.get("/api/v1/users", headers=viewer).get_json()] == ["alice", "vic", "dora"]
    problem(c.post("/api/v1/users", json={"name": "vic", "role": "viewer"}, headers=auth(app.alice)), 409, "exists")
    problem(c.post("/api/v1/users", json={"name": "x", "role": "root"}, headers=auth(app.alice)), 422, "role", "role")
    problem(c.post("/api/v1/users", json={"name": "Bad Name!"}, headers=auth(app.alice)), 422, "user name", "name")


def test_token_scopes_expiry_and_revocation(app):
    c = app.test_client()
    r = c.post("/api/v1/tokens", json={"name": "ci read", "scopes": ["read"], "expires_in_days": 7},
               headers=auth(app.alice))
    assert r.status_code == 201
    made = r.get_json()
    assert made["scopes"] == ["read"] and made["token"].startswith("tmk_")
    expires = dt.datetime.fromisoformat(made["expires_at"])
    assert dt.timedelta(days=6.99) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=7)
    read_only = auth(made["token"])
    me = c.get("/api/v1/me", headers=read_only).get_json()
    assert me == {"user": "alice", "organization": "acme", "role": "admin", "scopes": ["read"], "token": "ci read"}
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive
        assert c.get("/api/v1/me", headers={"Authorization": f"{scheme} {made['token']}"}).get_json() == me
    problem(c.post("/api/v1/devices", json={"id": "r-1", "target": "cortex-m4"}, headers=read_only), 403,
            "limited to read")
    problem(c.post("/api/v1/tokens", json={"name": "escalate", "scopes": ["deploy"]}, headers=read_only), 403,
            "does not hold deploy", "scopes")
    problem(c.post("/api/v1/tokens", json={"name": "x", "scopes": ["sudo"]}, headers=auth(app.alice)), 422, "scopes")
    # lists: never a secret or a hash; one's own tokens, an admin the organisation's
    listed = c.get("/api/v1/tokens", headers=auth(app.alice)).get_json()
    assert [t["name"] for t in listed] == ["initial", "ci read"]
    assert not any(k in t for t in listed for k in ("token", "token_hash"))
    assert [t["name"] for t in c.get("/api/v1/tokens", headers=auth(app.bob)).get_json()] == ["initial"]
    # revocation takes effect on the next request; another organisation's token id does not exist
    problem(c.delete(f"/api/v1/tokens/{made['id']}", headers=auth(app.bob)), 404, f"no token {made['id']}")
    assert c.get("/api/v1/me", headers=read_only).status_code == 200
    r = c.delete(f"/api/v1/tokens/{made['id']}", headers=auth(app.alice))
    assert r.status_code == 200 and r.get_json()["revoked_at"]
    problem(c.get("/api/v1/me", headers=read_only), 401, "revoked", "Authorization")
    # expiry
    other = c.post("/api/v1/tokens", json={"name": "short", "expires_in_days": 1}, headers=auth(app.alice)).get_json()
    assert c.get("/api/v1/devices", headers=auth(other["token"])).status_code == 200
    with app.extensions["tinymlaas"].sessions() as s:
        s.get(ApiToken, other["id"]).expires_at = dt.datetime(2020, 1, 1)
        s.commit()
    problem(c.get("/api/v1/devices", headers=auth(other["token"])), 401, "expired on 2020-01-01")
    problem(c.post("/api/v1/tokens", json={"name": "long", "expires_in_days": 99999}, headers=auth(app.alice)), 422,
            "expires_in_days", "expires_in_days")


def test_names_are_per_organisation_and_say_nothing_of_another(app):
    """A device or user name another organisation has was answered 409 (an existence oracle across tenants). Names
    are unique within an organisation: another's are free to take, and each device logs in to MQTT under its own
    key, with its own topics."""
    c = app.test_client()
    registered = {}
    for who, token in (("alice", app.alice), ("bob", app.bob)):
        r = c.post("/api/v1/devices", json={"id": "sensor-1", "target": "cortex-m4"}, headers=auth(token))
        assert r.status_code == 201, r.get_json()
        registered[who] = r.get_json()
        u = c.post("/api/v1/users", json={"name": "carol", "role": "viewer"}, headers=auth(token))
        assert u.status_code == 201, u.get_json()
        assert c.get("/api/v1/me", headers=auth(u.get_json()["token"])).get_json()["organization"] == (
            "acme" if who == "alice" else "globex")
    a, b = registered["alice"]["mqtt"], registered["bob"]["mqtt"]
    assert a["username"] != b["username"] and a["topic_root"] != b["topic_root"]
    assert a["topic_root"].endswith("/" + a["username"])
    authority = DeviceAuthority(app.extensions["tinymlaas"].sessions, "server-secret")
    assert authority.authenticate(a["username"], a["password"]) and authority.authenticate(b["username"], b["password"])
    assert not authority.authenticate(a["username"], b["password"])
    # within an organisation a name is still one device and one user
    problem(c.post("/api/v1/devices", json={"id": "sensor-1", "target": "cortex-m4"}, headers=auth(app.bob)), 409,
            "already registered", "id")
    problem(c.post("/api/v1/users", json={"name": "carol"}, headers=auth(app.bob)), 409, "exists", "name")
    for token, theirs in ((app.alice, a), (app.bob, b)):
        assert [d["id"] for d in c.get("/api/v1/devices", headers=auth(token)).get_json()] == ["sensor-1"]
        assert c.post("/api/v1/devices/sensor-1/credentials", headers=auth(token)).get_json()["username"] == (
            theirs["username"])


def test_a_rotated_device_secret_replaces_the_old_one(app):
    c = app.test_client()
    first = c.post("/api/v1/devices", json={"id": "rot-1", "target": "cortex-m4"}, headers=auth(app.alice)).get_json()
    r = c.post("/api/v1/devices/rot-1/credentials", headers=auth(app.alice))
    assert r.status_code == 200
    new = r.get_json()["password"]
    assert new != first["mqtt"]["password"]
    with app.extensions["tinymlaas"].sessions() as s:
        stored = s.get(Device, first["mqtt"]["username"]).secret_hash
    assert check_secret(new, stored) and not check_secret(first["mqtt"]["password"], stored)


def test_a_database_from_before_tenancy_migrates_with_its_tokens(tmp_path, make_app):
    """Users, devices and an active rollout of a schema-0003 database: one organisation after the upgrade, the old
    token still works, with every scope, and sees its rows."""
    from alembic import command

    from server.services.tenants import token_hash

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    command.upgrade(alembic_config(url), "0003")
    from sqlalchemy import create_engine, text

    with create_engine(url).begin() as con:
        con.execute(text("INSERT INTO users (id, name, token_hash, created_at) VALUES "
                         "(1, 'admin', :h, CURRENT_TIMESTAMP)"), {"h": token_hash("tmk_old")})
        con.execute(text("INSERT INTO devices (id, target, \"group\", flash_bytes, ram_bytes, secret_hash, state, "
                         "owner_id, created_at) VALUES ('old-1', 'cortex-m4', 'default', 1, 1, 'x', 'registered', 1, "
                         "CURRENT_TIMESTAMP)"))
    app = make_app(Settings(data_dir=tmp_path / "data", database_url=url))
    c = app.test_client()
    me = c.get("/api/v1/me", headers=auth("tmk_old")).get_json()
    assert me == {"user": "admin", "organization": "default", "role": "admin",
                  "scopes": ["admin", "build", "deploy", "read"], "token": "initial"}
    assert [d["id"] for d in c.get("/api/v1/devices", headers=auth("tmk_old")).get_json()] == ["old-1"]
    command.downgrade(alembic_config(url), "0003")  # and back, the token kept
    with create_engine(url).connect() as con:
        assert con.execute(text("SELECT token_hash FROM users")).scalar() == token_hash("tmk_old")


def test_a_token_makes_only_weaker_shorter_lived_children_that_end_with_it(app):
    """A read-only token that expired in a day could create one that never expired, and it outlived its parent's
    revocation. Now a child holds at most its parent's scopes and lifetime, and revoking the parent ends it."""
    c = app.test_client()
    day = c.post("/api/v1/tokens", json={"name": "day", "scopes": ["read"], "expires_in_days": 1},
                 headers=auth(app.alice)).get_json()
    for days in (None, 30):
        problem(c.post("/api/v1/tokens", json={"name": "longer", "scopes": ["read"], "expires_in_days": days},
                       headers=auth(day["token"])), 403, "cannot outlive", "expires_in_days")
    child = c.post("/api/v1/tokens", json={"name": "child", "scopes": ["read"]}, headers=auth(day["token"]))
    assert child.status_code == 201, child.get_json()
    child = child.get_json()
    assert child["expires_at"] == day["expires_at"]  # the default 90 days, cut to the parent's end
    grandchild = c.post("/api/v1/tokens", json={"name": "grandchild"}, headers=auth(child["token"])).get_json()
    assert c.get("/api/v1/me", headers=auth(grandchild["token"])).status_code == 200
    r = c.delete(f"/api/v1/tokens/{day['id']}", headers=auth(app.alice))
    assert r.status_code == 200
    for t in (child, grandchild):
        problem(c.get("/api/v1/me", headers=auth(t["token"])), 401, "revoked", "Authorization")


def test_revoking_needs_more_than_read_and_every_scope_reads(app):
    """A read-only token could revoke its user's full-access tokens; a build-only token could not read its own
    builds."""
    c = app.test_client()
    initial = next(t for t in c.get("/api/v1/tokens", headers=auth(app.alice)).get_json() if t["name"] == "initial")
    read_only = c.post("/api/v1/tokens", json={"name": "ro", "scopes": ["read"]}, headers=auth(app.alice)).get_json()
    problem(c.delete(f"/api/v1/tokens/{initial['id']}", headers=auth(read_only["token"])), 403, "scope")
    assert c.get("/api/v1/me", headers=auth(app.alice)).status_code == 200
    builder = c.post("/api/v1/tokens", json={"name": "ci", "scopes": ["build"]}, headers=auth(app.alice)).get_json()
    problem(c.delete(f"/api/v1/tokens/{initial['id']}", headers=auth(builder["token"])), 403, "scope")
    assert c.delete(f"/api/v1/tokens/{read_only['id']}", headers=auth(read_only["token"])).status_code == 200  # itself
    model = c.post("/api/v1/models", data={"file": (io.BytesIO(b"\x00" * 64), "x.tflite")},
                   headers=auth(builder["token"]))
    assert model.status_code in (201, 422)  # what it uploads is not the point: that it may read what it builds
    build_id = done_build(app, c, auth(app.alice), "g1")[0]
    assert c.get(f"/api/v1/builds/{build_id}", headers=auth(builder["token"])).status_code == 200
    assert c.get("/api/v1/builds", headers=auth(builder["token"])).status_code == 200


def test_devices_registered_before_names_were_per_organisation_keep_their_login(database_url, make_app, tmp_path):
    """A schema-0008 database (device ids global): after the upgrade the device keeps its id as MQTT user name and
    secret, is listed by its name, and another organisation may take the same device and user names."""
    import sqlalchemy as sa
    from alembic import command

    from server.broker import hash_secret
    from server.services.tenants import issue_token

    command.upgrade(alembic_config(database_url), "0008")
    engine = sa.create_engine(database_url)
    now = dt.datetime(2026, 12, 1)
    meta = sa.MetaData()
    meta.reflect(engine, only=("organizations", "users", "devices"))
    t = meta.tables
    with engine.begin() as conn:
        org = conn.execute(t["organizations"].insert().values(name="acme", created_at=now)).inserted_primary_key[0]
        user = conn.execute(t["users"].insert().values(name="ann", created_at=now, org_id=org, role="admin")
                            ).inserted_primary_key[0]
        conn.execute(t["devices"].insert().values(
            id="old-1", target="cortex-m4", group="default", flash_bytes=1, ram_bytes=1, secret_hash=hash_secret("s3"),
            state="registered", owner_id=user, org_id=org, created_at=now))
    engine.dispose()
    app = make_app(Settings(data_dir=tmp_path / "data", database_url=database_url))  # upgrades to the head
    c = app.test_client()
    with app.extensions["tinymlaas"].sessions() as s:
        _, ann = issue_token(s, s.get(User, user), "t", ["read", "deploy", "admin"], None)
        globex = create_organization(s, "globex")
        _, other = create_user(s, "ann", globex)  # the same user name elsewhere
        s.commit()
    assert [d["id"] for d in c.get("/api/v1/devices", headers=auth(ann)).get_json()] == ["old-1"]
    assert DeviceAuthority(app.extensions["tinymlaas"].sessions, "x").authenticate("old-1", "s3")
    assert c.post("/api/v1/devices/old-1/credentials", headers=auth(ann)).get_json()["username"] == "old-1"
    r = c.post("/api/v1/devices", json={"id": "old-1", "target": "cortex-m4"}, headers=auth(other))
    assert r.status_code == 201 and r.get_json()["mqtt"]["username"] == f"{globex.id}.old-1"
    problem(c.post("/api/v1/devices", json={"id": "old-1", "target": "cortex-m4"}, headers=auth(ann)), 409,
            "already registered", "id")
