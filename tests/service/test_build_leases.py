"""Exactly-once builds: a worker runs a build only under a lease in the database (owner and expiry, renewed while it
runs); builds whose lease lapsed are requeued once, however many workers recover at the same moment. Real app, real
database (SQLite and PostgreSQL), real compiler; no worker process (see test_fleet for the killed-worker flow)."""

import datetime as dt
import io
import time

import pytest
from sqlalchemy import select, update

from server.config import Settings
from server.db import Build, now
from server.jobs import Lease, LeaseLost, make_huey, recover_builds, run_build
from server.services.tenants import create_user
from tests.helpers.paths import CORPUS_OPS

FC = CORPUS_OPS / "fully_connected_int8.tflite"


@pytest.fixture
def app(tmp_path, database_url, make_app):
    app = make_app(Settings(data_dir=tmp_path / "data", database_url=database_url, build_inputs=2,
                              build_lease_seconds=3.0))
    with app.extensions["tinymlaas"].sessions() as s:
        _, app.token = create_user(s, "alice")
    return app


def _queued_build(app) -> int:
    c, auth = app.test_client(), {"Authorization": f"Bearer {app.token}"}
    m = c.post("/api/v1/models", data={"file": (io.BytesIO(FC.read_bytes()), "fc.tflite")}, headers=auth).get_json()
    return c.post("/api/v1/builds", json={"model_id": m["id"], "target": "cortex-m4"}, headers=auth).get_json()["id"]


def _build(app, build_id: int) -> Build:
    with app.extensions["tinymlaas"].sessions() as s:
        return s.get(Build, build_id)


def test_a_build_held_by_another_worker_is_not_run_again(app):
    ctx = app.extensions["tinymlaas"]
    build_id = _queued_build(app)
    other = Lease(ctx.sessions, build_id, 60)
    assert other.claim() and not Lease(ctx.sessions, build_id, 60).claim()  # one claim at a time
    run_build(ctx.settings, build_id)  # a second worker picks up the same task: it must not run it
    b = _build(app, build_id)
    assert (b.state, b.attempts, b.lease_owner) == ("building", 1, other.owner)
    other.release()
    run_build(ctx.settings, build_id)  # the claim is gone (its worker gave it up): now it runs, once more
    b = _build(app, build_id)
    assert (b.state, b.attempts, b.lease_owner) == ("done", 2, None) and b.report["verified"]
    run_build(ctx.settings, build_id)  # a duplicate task after the end changes nothing
    assert (_build(app, build_id).state, _build(app, build_id).attempts) == ("done", 2)


def test_only_lapsed_leases_are_requeued_and_only_once(app):
    ctx = app.extensions["tinymlaas"]
    running, lapsed = _queued_build(app), _queued_build(app)
    make_huey(ctx.settings.queue_url).flush()  # as if the workers had taken both tasks from the queue
    live = Lease(ctx.sessions, running, 60)
    dead = Lease(ctx.sessions, lapsed, 60)
    assert live.claim() and dead.claim()
    dead._stop.set()  # its worker died: nobody renews it
    with ctx.sessions() as s:
        s.execute(update(Build).where(Build.id == lapsed).values(lease_expires_at=now() - dt.timedelta(seconds=1)))
        s.commit()
    assert recover_builds(ctx.settings) == [lapsed]
    assert recover_builds(ctx.settings) == []  # requeued already: its task is in the queue
    b = _build(app, lapsed)
    assert (b.state, b.lease_owner) == ("queued", None) and _build(app, running).lease_owner == live.owner
    # the dead worker wakes up: it finds its claim gone and writes nothing
    with ctx.sessions() as s, pytest.raises(LeaseLost):
        dead.check(s.get(Build, lapsed))
    live.release()


def test_a_running_build_keeps_its_lease_alive(app):
    ctx = app.extensions["tinymlaas"]
    build_id = _queued_build(app)
    lease = Lease(ctx.sessions, build_id, 0.6)
    assert lease.claim()
    first = _build(app, build_id).lease_expires_at
    deadline = now() + dt.timedelta(seconds=3)
    while _build(app, build_id).lease_expires_at == first and now() < deadline:
        time.sleep(0.05)
    assert _build(app, build_id).lease_expires_at > first and not lease.lost.is_set()
    make_huey(ctx.settings.queue_url).flush()
    assert recover_builds(ctx.settings) == []  # renewed: not taken away from a worker that is alive
    lease.release()
    with ctx.sessions() as s:
        assert s.scalar(select(Build.lease_owner).where(Build.id == build_id)) is None
