"""The dashboard: server-rendered pages under /ui over the same service functions as the API.

Signing in takes a user's API token once; the session cookie (signed, HttpOnly, SameSite=Lax, Secure behind https)
keeps only the token's hash, and every request looks the token up again, so an expired or revoked token ends the
session. Every form carries a CSRF token (Flask-WTF) checked on every POST. The token's scopes decide what a page
offers and what a form may do: a viewer sees everything of its organisation and acts on nothing (the service says
why, as the API does). Jinja2 escapes every value: names holding HTML are shown as text.
"""

from __future__ import annotations

import json
import secrets
from functools import wraps
from pathlib import Path

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask import session as cookie
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy import func, select

from tinymlaas.build.request import BuildRequest, InvalidRequest, groups, parse_text, value_type
from tinymlaas.frontend.keras import QUANTIZE
from tinymlaas.ota.rollout import RolloutPlan
from tinymlaas.targets import all_targets

from .. import db
from ..api import ctx, get_or_404, session
from ..services.builds import OPEN_BUILD_STATES, cancel_build, request_build, with_variant
from ..services.common import Principal, ServiceError, of_org
from ..services.deployments import cancel_deployment, create_deployment, deployment_summary, events_of, jobs_of
from ..services.devices import PRESENCES, device_named, presence
from ..services.models import add_model, set_validation
from ..services.tenants import (
    create_user,
    issue_token,
    principal_for_hash,
    principal_for_token,
    revoke_token,
    token_hash,
    tokens_visible_to,
)

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")
csrf = CSRFProtect()


class SignInNeeded(Exception):
    def __init__(self, why: str | None = None):
        self.why = why
        super().__init__(why or "")


def secret_key(data_dir: Path) -> bytes:
    """The key that signs session cookies: made once per data folder (0600), so sessions outlive restarts."""
    path = data_dir / "keys" / "ui-session.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_bytes(secrets.token_bytes(32))
    return path.read_bytes()


def register_ui(app) -> None:
    settings = ctx_of(app).settings
    app.secret_key = secret_key(settings.data_dir)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
                      WTF_CSRF_CHECK_DEFAULT=False,  # the API takes bearer tokens, no cookies: only /ui is checked
                      WTF_CSRF_TIME_LIMIT=None)  # valid as long as the session
    csrf.init_app(app)
    app.register_blueprint(bp)


def ctx_of(app):
    return app.extensions["tinymlaas"]


def me() -> Principal:
    """Who the session's token stands for, looked up again (expired or revoked: the session ends)."""
    digest = cookie.get("token")
    if not digest:
        raise SignInNeeded()
    try:
        return principal_for_hash(session(), digest)
    except ServiceError as e:
        cookie.clear()
        raise SignInNeeded(str(e)) from None


def page(view):
    """A page of a signed-in user: `who` passed in."""
    @wraps(view)
    def wrapped(*args, **kwargs):
        return view(me(), *args, **kwargs)
    return wrapped


@bp.before_request
def _csrf():
    if request.method == "POST":
        csrf.protect()


@bp.errorhandler(SignInNeeded)
def _sign_in(e: SignInNeeded):
    if request.path.endswith(".json"):
        return jsonify({"error": e.why or "signed out"}), 401
    if e.why:
        flash(f"Signed out: {e.why}", "error")
    return redirect(url_for("ui.login", next=request.path if request.method == "GET" else None))


@bp.errorhandler(CSRFError)
def _csrf_error(e: CSRFError):
    return render_template("ui/error.html", status=400, message=f"The form was refused: {e.description} "
                           "Reload the page and send it again."), 400


@bp.errorhandler(ServiceError)
def _refused(e: ServiceError):
    if request.path.endswith(".json"):
        return jsonify({"error": str(e), "field": e.field}), e.status
    return render_template("ui/error.html", status=e.status, message=str(e), field=e.field), e.status


@bp.errorhandler(404)
def _missing(_e):
    return render_template("ui/error.html", status=404, message="No such page."), 404


@bp.app_template_filter("when")
def _when(value) -> str:
    return "never" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("number")
def _number(value) -> str:
    return "-" if value is None else f"{value:,}"


@bp.context_processor
def _common():
    return {"signed_in": bool(cookie.get("token")), "user_name": cookie.get("user"), "org_name": cookie.get("org")}


# --- signing in ---------------------------------------------------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("ui/login.html", next=request.args.get("next", ""))
    try:
        who = principal_for_token(session(), (request.form.get("token") or "").strip())
    except ServiceError as e:
        return render_template("ui/login.html", error=str(e), next=request.form.get("next", "")), 401
    cookie.clear()
    cookie.update(token=token_hash(request.form["token"].strip()), user=who.user.name,
                  org=session().get(db.Organization, who.org_id).name)
    target = request.form.get("next") or ""
    return redirect(target if target.startswith("/ui/") else url_for("ui.fleet"))


@bp.post("/logout")
def logout():
    cookie.clear()
    flash("Signed out.", "info")
    return redirect(url_for("ui.login"))


@bp.get("/")
def index():
    return redirect(url_for("ui.fleet"))


# --- the fleet ----------------------------------------------------------------------------------------------------

@bp.get("/fleet")
@page
def fleet(who):
    devices = session().scalars(of_org(who, db.Device, order=db.Device.name)).all()
    rows = [(d, presence(d)) for d in devices]
    wanted = {k: request.args.get(k, "") for k in ("group", "target", "state")}
    shown = [(d, s) for d, s in rows if (not wanted["group"] or d.group == wanted["group"])
             and (not wanted["target"] or d.target == wanted["target"]) and (not wanted["state"] or s == wanted["state"])]
    choices = {"group": sorted({d.group for d in devices}), "target": sorted({d.target for d in devices}),
               "state": list(PRESENCES)}
    return render_template("ui/fleet.html", rows=shown, total=len(rows), wanted=wanted, choices=choices)


@bp.get("/devices/<name>")
@page
def device(who, name):
    d = device_named(session(), who, name)
    if d is None:
        abort(404)
    jobs = _device_history(who, d)
    telemetry = session().scalars(select(db.Telemetry).where(db.Telemetry.device_id == d.id)
                                  .order_by(db.Telemetry.received_at.desc()).limit(20)).all()
    return render_template("ui/device.html", d=d, state=presence(d), jobs=jobs, telemetry=telemetry)


def _device_history(who, d: db.Device) -> list:
    """(job, deployment) of every rollout that reached the device, newest first."""
    q = (select(db.DeviceJob, db.Deployment).join(db.Deployment, db.Deployment.id == db.DeviceJob.deployment_id)
         .where(db.DeviceJob.device_id == d.id, db.Deployment.org_id == who.org_id)
         .order_by(db.Deployment.id.desc()).limit(100))
    return session().execute(q).all()


# --- models and builds --------------------------------------------------------------------------------------------

@bp.get("/models")
@page
def models(who):
    rows = session().scalars(of_org(who, db.Model, order=db.Model.id.desc())).all()
    return render_template("ui/models.html", models=rows, can_build="build" in who.scopes, quantize=QUANTIZE)


@bp.post("/models")
@page
def upload(who):
    f = request.files.get("file")
    if f is None or not f.filename:
        raise ServiceError(422, "choose a model file to upload", "file")
    samples = request.files.get("calibration")
    samples = samples.read() if samples is not None and samples.filename else None
    model = add_model(session(), ctx().store, who, f.filename, f.read(), request.form.get("quantize", "none"), samples)
    flash(f"Model {model.name} uploaded.", "info")
    return redirect(url_for("ui.model", model_id=model.id))


@bp.post("/models/<int:model_id>/validation")
@page
def upload_validation(who, model_id):
    m = get_or_404(db.Model, model_id, "model", who)
    f = request.files.get("file")
    if f is None or not f.filename:
        raise ServiceError(422, "choose an .npz of held-out samples (x and y) to upload", "file")
    set_validation(session(), ctx().store, who, m, f.read())
    flash(f"Validation set of {m.validation_samples:,} samples kept: every microcontroller build of {m.name} reports "
          "its accuracy on them.", "info")
    return redirect(url_for("ui.model", model_id=m.id))


@bp.get("/models/<int:model_id>")
@page
def model(who, model_id):
    m = get_or_404(db.Model, model_id, "model", who)
    builds = session().scalars(of_org(who, db.Build, order=db.Build.id.desc()).where(db.Build.model_id == m.id)).all()
    return render_template("ui/model.html", m=m, builds=builds, targets=sorted(all_targets()),
                           can_build="build" in who.scopes, option_groups=BUILD_FORM)


def _form_fields() -> list[tuple[str, list[dict]]]:
    """The build form's fields, one per option the service's build request offers (tinymlaas.build.request
    declares them once: the API's schema, the CLI's flags and this form), by the object the API nests them in."""
    titles = {None: "Build", "search": "Variant search", "constraints": "Constraints", "host": "Host targets"}
    out = []
    for group, members in groups("service").items():
        fields = [{"name": f.name, "kind": value_type(f).__name__, "choices": opt.allowed(), "default": f.default,
                   "help": opt.help, "unit": opt.unit, "min": opt.min, "max": opt.max}
                  for f, opt in members if opt.unit != "path"]
        out.append((titles.get(group, group), fields))
    order = list(titles.values())
    return sorted(out, key=lambda g: order.index(g[0]) if g[0] in order else len(order))


BUILD_FORM = _form_fields()
SEARCH_OPTIONS = {f.name for f, _ in groups("service").get("search", [])}


def build_request_of(form) -> BuildRequest:
    """The options a build form gives (empty: the option's default), parsed as their declaration says; their
    ranges, choices and where they apply are checked by the service (request_build), as for the API."""
    values = {}
    for _, fields in BUILD_FORM:
        for field in fields:
            text = (form.get(field["name"]) or "").strip()
            if not text:
                continue
            try:
                values[field["name"]] = parse_text(field["name"], text)
            except InvalidRequest as e:
                raise ServiceError(422, f"{e.name}: {e.why}", e.name) from None
    if "budget" not in values and SEARCH_OPTIONS & set(values):
        raise ServiceError(422, f"{', '.join(sorted(SEARCH_OPTIONS & set(values)))}: a search needs its budget (how "
                           "many variants to build)", "budget")
    return BuildRequest(**values)


@bp.post("/builds")
@page
def new_build(who):
    form = request.form
    build = _queued(who, _int(form.get("model_id"), "model_id"), form.get("target", ""), build_request_of(form),
                    form.get("version") or None)
    return redirect(url_for("ui.build", build_id=build.id))


def _queued(who, model_id: int, target: str, build_request: BuildRequest, version: str | None = None) -> db.Build:
    """A build requested as the API requests one (its checks, the user's limit of open builds), and queued."""
    build = request_build(session(), who, model_id, target, build_request, version,
                          max_open=ctx().settings.max_open_builds, store=ctx().store)
    ctx().enqueue_build(build.id)
    return build


def _int(text, field: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ServiceError(422, f"{field}: a whole number", field) from None


@bp.get("/builds")
@page
def builds(who):
    rows = session().execute(of_org(who, db.Build, db.Model.name, order=db.Build.id.desc())
                             .join(db.Model, db.Model.id == db.Build.model_id)).all()
    return render_template("ui/builds.html", rows=rows)


@bp.get("/builds/<int:build_id>")
@page
def build(who, build_id):
    b = get_or_404(db.Build, build_id, "build", who)
    m = session().get(db.Model, b.model_id)
    front = None
    if "front" in (b.artifacts or {}):
        front = json.loads(ctx().store.path(b.artifacts["front"]).read_text())
    return render_template("ui/build.html", b=b, m=m, report=b.report or {}, front=_front_points(front),
                           can_deploy="deploy" in who.scopes, can_build="build" in who.scopes,
                           open_states=OPEN_BUILD_STATES)


def _front_points(front: dict | None) -> dict | None:
    """What the chart draws of a search's front.json: every point, the front and the chosen one."""
    if not front:
        return None
    points = [{"i": i, "label": p["label"], "cost": p["cost"], "ram": p["ram"], "flash": p["flash"],
               "verified": p["verified"], "accuracy": p.get("accuracy"), "variant": p["variant"]}
              for i, p in enumerate(front["points"]) if p.get("cost") is not None]
    kind = next((p["cost_kind"] for p in front["points"] if p.get("cost") is not None), "instructions")
    return {"points": points, "front": front["front"], "chosen": front["chosen"], "default": front["default"],
            "cost_kind": kind}


@bp.post("/builds/<int:build_id>/variant")
@page
def build_variant(who, build_id):
    """A new build of the same model and target as exactly the search point picked on the chart (its variant kept
    in the artifact store, the build reading it as `--variant` would)."""
    b = get_or_404(db.Build, build_id, "build", who)
    if "front" not in (b.artifacts or {}):
        raise ServiceError(409, f"build {build_id} ran no search: it has no points to pick from")
    points = json.loads(ctx().store.path(b.artifacts["front"]).read_text())["points"]
    index = _int(request.form.get("point"), "point")
    if not 0 <= index < len(points) or points[index].get("cost") is None:
        raise ServiceError(422, f"point: one of the {len(points)} points the search built", "point")
    new = _queued(who, b.model_id, b.target, with_variant(ctx().store, BuildRequest(), points[index]["variant"]))
    flash(f"Build #{new.id}: point {index} of build #{build_id}'s search ({points[index]['label']}).", "info")
    return redirect(url_for("ui.build", build_id=new.id))


@bp.get("/builds/<int:build_id>.json")
@page
def build_status(who, build_id):
    b = get_or_404(db.Build, build_id, "build", who)
    return jsonify({"state": b.state, "stage": b.stage, "progress": b.progress, "message": b.message})


@bp.post("/builds/<int:build_id>/cancel")
@page
def cancel_build_page(who, build_id):
    cancel_build(session(), who, get_or_404(db.Build, build_id, "build", who))
    return redirect(url_for("ui.build", build_id=build_id))


# --- rollouts -----------------------------------------------------------------------------------------------------

@bp.get("/rollouts")
@page
def rollouts(who):
    rows = session().scalars(of_org(who, db.Deployment, order=db.Deployment.id.desc())).all()
    sent = dict(session().execute(  # bytes over the air per rollout (its jobs' payloads)
        select(db.DeviceJob.deployment_id, func.sum(db.DeviceJob.payload_bytes))
        .where(db.DeviceJob.deployment_id.in_([d.id for d in rows])).group_by(db.DeviceJob.deployment_id)).all())
    done = session().scalars(of_org(who, db.Build, order=db.Build.id.desc()).where(db.Build.state == "done")).all()
    groups = sorted(set(session().scalars(of_org(who, db.Device.group, order=db.Device.group))))
    return render_template("ui/rollouts.html", rows=rows, builds=[b for b in done if "image" in (b.artifacts or {})],
                           groups=groups, can_deploy="deploy" in who.scopes, sent=sent,
                           chosen=request.args.get("build", type=int))


@bp.post("/rollouts")
@page
def new_rollout(who):
    form = request.form
    try:
        stages = tuple(float(x) for x in (form.get("stages") or "100").replace(",", " ").split())
        plan = RolloutPlan(stages, float(form.get("success_threshold") or 0.95),
                           float(form.get("error_threshold") or 0.05))
    except ValueError:
        raise ServiceError(422, "stages and thresholds: numbers (stages as percents, e.g. 10 50 100)",
                           "stages") from None
    dep = create_deployment(session(), who, _int(form.get("build_id"), "build_id"), form.get("group") or "", plan,
                            force=form.get("force") == "on")
    ctx().deployment_started(dep.id)
    return redirect(url_for("ui.rollout", dep_id=dep.id))


@bp.get("/rollouts/<int:dep_id>")
@page
def rollout(who, dep_id):
    dep = get_or_404(db.Deployment, dep_id, "deployment", who)
    return render_template("ui/rollout.html", dep=dep, summary=deployment_summary(session(), dep),
                           jobs=jobs_of(session(), dep), events=events_of(session(), dep),
                           can_deploy="deploy" in who.scopes)


@bp.get("/rollouts/<int:dep_id>.json")
@page
def rollout_status(who, dep_id):
    dep = get_or_404(db.Deployment, dep_id, "deployment", who)
    jobs = jobs_of(session(), dep)
    return jsonify({"state": dep.state, "reason": dep.reason, "summary": deployment_summary(session(), dep),
                    "jobs": [{"device": j.device.name, "stage": j.stage, "status": j.status, "step": j.step,
                              "progress": j.progress} for j in jobs],
                    "events": len(events_of(session(), dep))})


@bp.post("/rollouts/<int:dep_id>/cancel")
@page
def cancel_rollout(who, dep_id):
    cancel_deployment(session(), who, get_or_404(db.Deployment, dep_id, "deployment", who).id)
    return redirect(url_for("ui.rollout", dep_id=dep_id))


# --- tokens (admins) ----------------------------------------------------------------------------------------------

@bp.get("/tokens")
@page
def tokens(who):
    who.need("admin")
    return render_template("ui/tokens.html", tokens=tokens_visible_to(session(), who), new_token=None,
                           scopes=db.SCOPES, me=who.token.id)


@bp.post("/tokens")
@page
def new_token(who):
    who.need("admin")
    scopes = request.form.getlist("scopes")
    days = _int(request.form.get("days"), "expires_in_days") if request.form.get("days") else None
    _, token = issue_token(session(), who.user, request.form.get("name", ""), scopes, days, parent=who.token)
    return render_template("ui/tokens.html", tokens=tokens_visible_to(session(), who), new_token=token,
                           scopes=db.SCOPES, me=who.token.id)


@bp.post("/tokens/<int:token_id>/revoke")
@page
def revoke(who, token_id):
    who.need("admin")
    revoke_token(session(), who, token_id)
    return redirect(url_for("ui.tokens"))


@bp.get("/users")
@page
def users(who):
    who.need("admin")
    return render_template("ui/users.html", users=session().scalars(of_org(who, db.User)).all(), roles=list(db.ROLES),
                           created=None)


@bp.post("/users")
@page
def new_user(who):
    who.need("admin")
    user, token = create_user(session(), request.form.get("name", ""), session().get(db.Organization, who.org_id),
                              request.form.get("role", "developer"), token_days=90)
    return render_template("ui/users.html", users=session().scalars(of_org(who, db.User)).all(), roles=list(db.ROLES),
                           created=(user.name, token))
