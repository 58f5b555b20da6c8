"""The dashboard through Flask's test client: sign-in and its session, CSRF, roles, names shown as text.
(tests/service/test_dashboard_browser.py drives the same pages in Chromium.)"""

import re

import pytest

from server.services.tenants import create_user, principal_for_token, revoke_token
from tests.helpers import quantized_layers as q

XSS = "<img src=x onerror=alert(1)>"  # (a file name cannot hold '"' or '/')


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF field in the form"
    return m.group(1)


def sign_in(client, token: str):
    page = client.get("/ui/login")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'name="token"' in html
    return client.post("/ui/login", data={"token": token, "csrf_token": csrf_of(html)})


@pytest.fixture
def ui(app):
    c = app.test_client()
    r = sign_in(c, app.token)
    assert r.status_code == 302 and r.headers["Location"].endswith("/ui/fleet")
    c.csrf = csrf_of(c.get("/ui/models").get_data(as_text=True))
    return c


def test_sign_in_sets_a_guarded_session_cookie_holding_no_token(app):
    c = app.test_client()
    r = sign_in(c, app.token)
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert app.token not in cookie
    for path in ("/ui/fleet", "/ui/models", "/ui/builds", "/ui/rollouts", "/ui/tokens", "/ui/users"):
        page = c.get(path)
        assert page.status_code == 200, path
        assert "alice" in page.get_data(as_text=True)


def test_pages_need_a_session_and_a_wrong_token_is_refused(app):
    c = app.test_client()
    r = c.get("/ui/fleet")
    assert r.status_code == 302 and "/ui/login" in r.headers["Location"]
    assert c.get("/ui/builds/1.json").status_code == 401
    r = sign_in(c, "tmk_not-a-token")
    assert r.status_code == 401 and "a valid API token is needed" in r.get_data(as_text=True)


def test_forms_without_the_csrf_token_are_refused(app, ui):
    fresh = app.test_client()
    r = fresh.post("/ui/login", data={"token": app.token})
    assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True)
    r = ui.post("/ui/models", data={"file": (q.fully_connected(1, [1, 16], 4, 0), "m.tflite")})
    assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True)
    r = ui.post("/ui/models", data={"csrf_token": "forged", "file": (q.fully_connected(1, [1, 16], 4, 0), "m.tflite")})
    assert r.status_code == 400
    assert "No model uploaded yet" in ui.get("/ui/models").get_data(as_text=True)  # nothing was stored
    r = ui.post("/ui/logout")
    assert r.status_code == 400 and ui.get("/ui/fleet").status_code == 200  # still signed in


def test_names_holding_html_are_shown_as_text(app, ui):
    from io import BytesIO

    r = ui.post("/ui/models", data={"csrf_token": ui.csrf,
                                     "file": (BytesIO(q.fully_connected(1, [1, 16], 4, 0)), f"{XSS}.tflite")},
                content_type="multipart/form-data")
    assert r.status_code == 302
    for path in ("/ui/models", r.headers["Location"]):
        html = ui.get(path).get_data(as_text=True)
        assert XSS not in html and "&lt;img src=x onerror=alert(1)&gt;" in html, path


def test_device_and_group_names_cannot_hold_html_and_other_names_show_as_text(app, ui):
    """Device, group and token names are refused with markup (the service's name rules: MQTT topics hold the first
    two); model names, which come from file names, are shown as text (above)."""
    c = app.test_client()
    auth = {"Authorization": f"Bearer {app.token}"}
    for body, field in (({"id": XSS, "target": "cortex-m4"}, "id"),
                        ({"id": "ok-dev", "target": "cortex-m4", "group": XSS}, "group")):
        r = c.post("/api/v1/devices", json=body, headers=auth)
        assert r.status_code == 422 and r.get_json()["field"] == field, r.get_json()
    r = ui.post("/ui/tokens", data={"csrf_token": ui.csrf, "name": XSS, "scopes": "read", "days": "3"})
    assert r.status_code == 422 and 'id="refusal"' in r.get_data(as_text=True)
    assert XSS not in r.get_data(as_text=True) and XSS not in ui.get("/ui/tokens").get_data(as_text=True)


def test_a_viewer_sees_and_is_refused_every_action(app):
    with app.extensions["tinymlaas"].sessions() as s:
        admin = principal_for_token(s, app.token)
        _, viewer = create_user(s, "vera", _org(s, admin), role="viewer")
    c = app.test_client()
    assert sign_in(c, viewer).status_code == 302
    models = c.get("/ui/models").get_data(as_text=True)
    assert 'id="upload-form"' not in models  # nothing offered
    from io import BytesIO

    r = c.post("/ui/models", data={"csrf_token": csrf_of(c.get("/ui/login").get_data(as_text=True)),
                                    "file": (BytesIO(q.fully_connected(1, [1, 16], 4, 0)), "m.tflite")},
               content_type="multipart/form-data")
    assert r.status_code == 403 and "your role (viewer) does not allow it" in r.get_data(as_text=True)
    assert c.get("/ui/tokens").status_code == 403


def _org(s, who):
    from server.db import Organization

    return s.get(Organization, who.org_id)


def test_a_revoked_token_ends_the_session(app, ui):
    with app.extensions["tinymlaas"].sessions() as s:
        who = principal_for_token(s, app.token)
        revoke_token(s, who, who.token.id)
    r = ui.get("/ui/fleet")
    assert r.status_code == 302 and "/ui/login" in r.headers["Location"]
    page = ui.get(r.headers["Location"]).get_data(as_text=True)
    assert "was revoked" in page


def test_sign_out_ends_the_session(ui):
    r = ui.post("/ui/logout", data={"csrf_token": ui.csrf})
    assert r.status_code == 302
    assert ui.get("/ui/fleet").status_code == 302


def test_an_admin_adds_a_user_whose_token_signs_in(app, ui):
    r = ui.post("/ui/users", data={"csrf_token": ui.csrf, "name": "dana", "role": "viewer"})
    assert r.status_code == 200
    token = re.search(r'id="user-token">([^<]+)<', r.get_data(as_text=True)).group(1)
    other = app.test_client()
    assert sign_in(other, token).status_code == 302
    assert "dana" in other.get("/ui/fleet").get_data(as_text=True)
    assert other.get("/ui/users").status_code == 403  # a viewer
    r = ui.post("/ui/users", data={"csrf_token": ui.csrf, "name": "dana", "role": "viewer"})
    assert r.status_code == 409 and "exists" in r.get_data(as_text=True)


@pytest.mark.parametrize("path,form", [
    ("/ui/builds", {"model_id": "x", "target": "cortex-m4"}),
    ("/ui/builds", {"model_id": "999", "target": "cortex-m4"}),
    ("/ui/builds", {"model_id": "1", "target": "no-such-board", "budget": "-3"}),
    ("/ui/models", {}),
    ("/ui/rollouts", {"build_id": "1", "group": "g", "stages": "ten"}),
    ("/ui/rollouts", {"build_id": "", "group": "", "stages": "50 100", "success_threshold": "2"}),
    ("/ui/rollouts/99/cancel", {}),
    ("/ui/builds/99/cancel", {}),
    ("/ui/builds/99/variant", {"point": "0"}),
    ("/ui/tokens", {"name": "<b>", "scopes": "root", "days": "many"}),
    ("/ui/tokens/99/revoke", {}),
    ("/ui/users", {"name": "Bad Name!", "role": "king"}),
])
def test_bad_forms_are_refused_with_a_reason_never_a_server_error(ui, path, form):
    r = ui.post(path, data={"csrf_token": ui.csrf, **form})
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert 'id="refusal"' in r.get_data(as_text=True) or r.status_code == 404


def test_the_slot_a_device_reports_is_kept_and_shown(app, ui):
    from server.services.devices import record_state, register_device

    with app.extensions["tinymlaas"].sessions() as s:
        who = principal_for_token(s, app.token)
        device, _ = register_device(s, who, "slotted", "cortex-m4")
        for state, slot in (({"state": "online", "slot": 1}, 1), ({"state": "online", "slot": True}, 1),
                            ({"state": "online", "slot": 7}, 1), ({"state": "online", "slot": 0}, 0)):
            record_state(s, device.id, state)
            s.refresh(device)
            assert device.slot == slot, state
    assert "in slot A" in ui.get("/ui/devices/slotted").get_data(as_text=True)


def test_the_build_form_offers_each_option_the_service_declares_and_queues_what_it_says(app, ui):
    """The form is made from the build request's declaration (the API's schema comes from it too): a field per
    option the service offers, and what the form sends is the request queued."""
    from io import BytesIO

    from server.db import Build
    from tinymlaas.build.request import BuildRequest, groups

    r = ui.post("/ui/models", data={"csrf_token": ui.csrf, "file": (BytesIO(q.fully_connected(1, [1, 16], 4, 0)),
                                                                    "m.tflite")}, content_type="multipart/form-data")
    page = ui.get(r.headers["Location"]).get_data(as_text=True)
    for members in groups("service").values():
        for f, opt in members:
            assert (f'name="{f.name}"' in page) == (opt.unit != "path"), f.name
    model_id = int(r.headers["Location"].rsplit("/", 1)[1])
    form = {"csrf_token": ui.csrf, "model_id": str(model_id), "target": "cortex-m4", "max_ram": "6K", "budget": "4",
            "strategy": "random", "weights": "int4", "estimate_cycles": "no", "precision": ""}
    r = ui.post("/ui/builds", data=form)
    assert r.status_code == 302, r.get_data(as_text=True)
    with app.extensions["tinymlaas"].sessions() as s:
        build = s.get(Build, int(r.headers["Location"].rsplit("/", 1)[1]))
        assert build.request == BuildRequest(max_ram=6144, budget=4, strategy="random", weights="int4",
                                             estimate_cycles=False)


@pytest.mark.parametrize("form, field, why", [
    ({"max_ram": "lots"}, "max_ram", "is not a size"),
    ({"strategy": "guided"}, "budget", "a search needs its budget"),
    ({"budget": "2.5"}, "budget", "is not an integer"),
    ({"emulator": "abacus"}, "emulator", "must be one of"),
    ({"estimate_cycles": "maybe"}, "estimate_cycles", "is not yes or no"),
    ({"precision": "float16"}, "precision", "applies to"),
])
def test_bad_build_options_are_refused_naming_the_field_and_nothing_is_queued(app, ui, form, field, why):
    from io import BytesIO

    from server.db import Build

    r = ui.post("/ui/models", data={"csrf_token": ui.csrf, "file": (BytesIO(q.fully_connected(1, [1, 16], 4, 0)),
                                                                    "m.tflite")}, content_type="multipart/form-data")
    model_id = r.headers["Location"].rsplit("/", 1)[1]
    r = ui.post("/ui/builds", data={"csrf_token": ui.csrf, "model_id": model_id, "target": "cortex-m4", **form})
    html = r.get_data(as_text=True)
    assert r.status_code == 422 and why in html, html
    assert field.replace("_", "-") in html or field in html
    with app.extensions["tinymlaas"].sessions() as s:
        assert s.query(Build).count() == 0


def test_a_validation_set_uploaded_on_the_model_page_is_kept(app, ui):
    from io import BytesIO

    import numpy as np

    r = ui.post("/ui/models", data={"csrf_token": ui.csrf, "file": (BytesIO(q.fully_connected(1, [1, 16], 4, 0)),
                                                                    "m.tflite")}, content_type="multipart/form-data")
    page = r.headers["Location"]
    buf = BytesIO()
    np.savez(buf, x=np.zeros((5, 16), np.float32), y=np.zeros(5, np.int64))
    r = ui.post(page + "/validation", data={"csrf_token": ui.csrf, "file": (BytesIO(buf.getvalue()), "v.npz")},
                content_type="multipart/form-data")
    assert r.status_code == 302
    assert "5 samples" in ui.get(page).get_data(as_text=True)
    r = ui.post(page + "/validation", data={"csrf_token": ui.csrf, "file": (BytesIO(b"not an npz"), "v.npz")},
                content_type="multipart/form-data")
    assert r.status_code == 422 and 'id="refusal"' in r.get_data(as_text=True)
    assert "5 samples" in ui.get(page).get_data(as_text=True)  # the earlier set kept


def test_a_rollouts_page_shows_its_history(app, ui):
    from tests.helpers.api import done_build

    client = app.test_client()
    build_id, _ = done_build(app, client, {"Authorization": f"Bearer {app.token}"}, "hist")
    r = ui.post("/ui/rollouts", data={"csrf_token": ui.csrf, "build_id": str(build_id), "group": "hist",
                                      "stages": "100"})
    assert r.status_code == 302
    page = r.headers["Location"]
    assert ui.post(page + "/cancel", data={"csrf_token": ui.csrf}).status_code == 302
    html = ui.get(page).get_data(as_text=True)
    title = re.search(r"<title>(.*?)</title>", html, re.DOTALL).group(1)
    assert "<" not in title and html.count('id="history"') == 1, title  # the history is in the page, once
    history = html[html.index('id="history"'):]
    assert history.index("created") < history.index("cancelled by alice")
    assert ui.get(page + ".json").get_json()["events"] >= 2
