"""The service's subcommands of `tinymlaas` (serve, worker, agent, demo, and the API client commands).

Registered through the `tinymlaas.commands` entry point: the core CLI never imports the server.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tinymlaas.cli import _size
from tinymlaas.errors import TinyMLaaSError

# --- the service: server, worker, device agent, and the API client commands -----------------------------------

def _client(args):
    from server.client import Client

    token = args.token or os.environ.get("TINYMLAAS_TOKEN")
    if not token:
        path = Path(os.environ.get("TINYMLAAS_DATA", "instance")) / "admin.token"
        if path.exists():
            token = path.read_text().strip()
    if not token:
        raise TinyMLaaSError("an API token is needed: --token, TINYMLAAS_TOKEN, or DATA/admin.token")
    return Client(args.server, token)


def _print(obj, as_json: bool, fmt) -> None:
    print(json.dumps(obj, indent=2) if as_json else fmt(obj))


def cmd_serve(args) -> int:
    import time

    from server.config import Settings
    from server.runtime import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    settings = Settings(data_dir=args.data, mqtt=args.mqtt, mqtt_port=args.mqtt_port,
                        public_url=args.public_url or Settings.public_url, mqtt_tls=args.mqtt_tls,
                        mqtt_client_certs=args.mqtt_client_certs)
    server = Server(settings, args.host, args.port, args.workers).start()
    print(f"tinymlaas server on {server.url} (data {settings.data_dir}, MQTT {args.mqtt} on "
          f"{settings.mqtt_host}:{settings.mqtt_port}, {args.workers} build worker(s))")
    print(f"admin token in {settings.data_dir / 'admin.token'}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def cmd_worker(args) -> int:
    from server.config import Settings
    from server.jobs import run_worker
    from server.runtime import die_with_server

    die_with_server()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env() if args.data is None else Settings(data_dir=args.data)
    run_worker(settings, args.workers)
    return 0


def cmd_agent(args) -> int:
    import time

    from server.agent import Agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = args.token or os.environ.get("TINYMLAAS_TOKEN")
    agent = Agent(args.server, args.id, args.target, args.state_dir or f"devices/{args.id}", token, args.group,
                  board=args.board)
    agent.start()
    print(f"device {args.id} ({args.target}) running {agent.version or 'no image'}; Ctrl-C stops it")
    try:
        while agent.crashed is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
    return 0


def cmd_devices_register(args) -> int:
    d = _client(args).register_device(args.id, args.target, args.group)
    _print(d, args.json, lambda d: f"registered {d['id']} ({d['target']}, group {d['group']}); MQTT user "
           f"{d['mqtt']['username']} password {d['mqtt']['password']} (shown once)")
    return 0


def cmd_devices_list(args) -> int:
    rows = _client(args).devices(args.group)

    def fmt(rows):
        out = [f"{'device':<20} {'target':<11} {'group':<12} {'state':<10} {'firmware':<12} instructions"]
        out += [f"{d['id']:<20} {d['target']:<11} {d['group']:<12} {d['state']:<10} "
                f"{d['firmware_version'] or '-':<12} {d['instructions'] or '-'}" for d in rows]
        return "\n".join(out)
    _print(rows, args.json, fmt)
    return 0


def cmd_models_upload(args) -> int:
    m = _client(args).upload_model(args.file)
    _print(m, args.json, lambda m: f"model {m['id']}: {m['name']} ({m['size']:,} B, "
           f"{'int8' if m['quantized'] else 'float'}, sha256 {m['sha256'][:12]})")
    return 0


def _format_build(b: dict) -> str:
    line = f"build {b['id']}: model {b['model_id']} for {b['target']}, version {b['version']}: {b['state']}"
    if b["state"] not in ("done", "failed", "cancelled"):
        line += f" ({b['stage'] or 'waiting'}, {b['progress']:.0%})"
    if b.get("message"):
        line += f" — {b['message']}"
    r = b.get("report") or {}
    if r:
        line += (f"\n  {r['instructions']:,} instructions/inference, flash {r['sizes']['flash_model']:,} B, "
                 f"RAM {r['sizes']['ram_model']:,} B, verified {r['verified']}; image {r['image']['size']:,} B")
    return line


def _wait_build(client, build_id: int) -> dict:
    from tqdm import tqdm

    with tqdm(total=100, desc=f"build {build_id}", unit="%", file=sys.stderr, leave=False) as bar:
        def show(b):
            bar.n = int(b["progress"] * 100)
            bar.set_postfix_str(f"{b['state']} {b['stage'] or ''}")
            bar.refresh()
        return client.wait_build(build_id, on_progress=show)


def cmd_builds_request(args) -> int:
    client = _client(args)
    constraints = {k: v for k, v in (("max_flash", args.max_flash), ("max_ram", args.max_ram)) if v}
    host = {k: v for k, v in (("precision", args.precision), ("tune_trials", args.tune_trials),
                              ("tune_minutes", args.tune_minutes)) if v is not None}
    b = client.request_build(args.model, args.target, args.version, args.emulator, host or None, **constraints)
    if args.wait:
        b = _wait_build(client, b["id"])
    _print(b, args.json, _format_build)
    return 0 if b["state"] != "failed" else 1


def cmd_builds_status(args) -> int:
    client = _client(args)
    b = _wait_build(client, args.id) if args.wait else client.build(args.id)
    _print(b, args.json, _format_build)
    return 0


def cmd_builds_download(args) -> int:
    path = _client(args).download_artifact(args.id, args.artifact, args.out)
    print(f"{path} ({path.stat().st_size:,} B)")
    return 0


def _watch_rollout(client, dep_id: int) -> dict:
    from server.client import draw_rollout

    last = None

    def show(d):
        nonlocal last
        text = draw_rollout(d)
        if text != last and sys.stderr.isatty():
            print(text, file=sys.stderr)
        last = text
    return client.wait_deployment(dep_id, on_progress=show)


def cmd_deploy(args) -> int:
    client = _client(args)
    stages = [int(x) for x in args.stages.split(",")]
    d = client.deploy(args.build, args.group, stages, args.success_threshold, args.error_threshold, args.force,
                      args.job_timeout)
    if args.wait:
        d = _watch_rollout(client, d["id"])
    return _show_rollout(client, d["id"], args.json)


def _show_rollout(client, dep_id: int, as_json: bool) -> int:
    from server.client import draw_rollout

    d = client.deployment(dep_id)
    _print(d, as_json, draw_rollout)
    return 0 if d["state"] != "halted" else 1


def cmd_rollouts_status(args) -> int:
    client = _client(args)
    if args.id is None:
        deps = client.deployments()
        if not deps:
            print("no deployments")
            return 0
        args.id = deps[-1]["id"]
    if args.wait:
        _watch_rollout(client, args.id)
    return _show_rollout(client, args.id, args.json)


def cmd_rollouts_cancel(args) -> int:
    client = _client(args)
    client.cancel_deployment(args.id)
    return _show_rollout(client, args.id, args.json)


def cmd_rollouts_rollback(args) -> int:
    client = _client(args)
    d = client.rollback(args.id)
    if args.wait:
        _watch_rollout(client, d["id"])
    return _show_rollout(client, d["id"], args.json)


def cmd_orgs_create(args) -> int:
    """An operator's command (it opens the server's database): a new tenant and its first admin."""
    from server.config import Settings
    from server.db import make_engine, make_sessionmaker, upgrade
    from server.service import ServiceError, create_organization, create_user

    settings = Settings(data_dir=Path(args.data))
    upgrade(settings.database_url)
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        try:
            user, token = create_user(session, args.admin, create_organization(session, args.name),
                                      token_days=args.expires_in_days)
        except ServiceError as e:
            raise TinyMLaaSError(f"{e.field}: {e}" if e.field else str(e)) from None
    _print({"organization": args.name, "admin": user.name, "token": token}, args.json,
           lambda d: f"organisation {d['organization']}: admin {d['admin']}, token {d['token']} (shown once)")
    return 0


def cmd_whoami(args) -> int:
    _print(_client(args).me(), args.json, lambda d: f"{d['user']} ({d['role']}) in {d['organization']}; token "
           f"'{d['token']}' may {', '.join(d['scopes'])}")
    return 0


def cmd_users_create(args) -> int:
    u = _client(args).create_user(args.name, args.role)
    _print(u, args.json, lambda u: f"user {u['name']} ({u['role']}); token {u['token']} (shown once, 90 days)")
    return 0


def cmd_users_list(args) -> int:
    _print(_client(args).users(), args.json,
           lambda rows: "\n".join([f"{'id':>4} {'user':<24} role"] + [f"{u['id']:>4} {u['name']:<24} {u['role']}"
                                                                        for u in rows]))
    return 0


def cmd_tokens_create(args) -> int:
    scopes = args.scopes.split(",") if args.scopes else None
    days = None if args.expires_in_days == 0 else args.expires_in_days
    t = _client(args).create_token(args.name, scopes, days)
    _print(t, args.json, lambda t: f"token {t['id']} '{t['name']}' ({', '.join(t['scopes'])}; "
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
    _print(_client(args).tokens(), args.json, fmt)
    return 0


def cmd_tokens_revoke(args) -> int:
    t = _client(args).revoke_token(args.id)
    _print(t, args.json, lambda t: f"token {t['id']} '{t['name']}' revoked")
    return 0


def cmd_devices_rotate(args) -> int:
    d = _client(args).rotate_device_secret(args.id)
    _print(d, args.json, lambda d: f"{d['username']}: new secret {d['password']} (shown once; the old one is refused)")
    return 0


def cmd_demo(args) -> int:
    from server.demo import run_demo

    return run_demo(Path(args.model), Path(args.data))


def register(sub) -> None:
    def api(p):
        p.add_argument("--server", default=os.environ.get("TINYMLAAS_SERVER", "http://127.0.0.1:8080"),
                       help="server URL (env TINYMLAAS_SERVER)")
        p.add_argument("--token", help="API token (env TINYMLAAS_TOKEN; default: DATA/admin.token)")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = sub.add_parser("serve", help="run the server: API, MQTT broker and coordinator, build workers")
    p.add_argument("--data", default=os.environ.get("TINYMLAAS_DATA", "instance"), help="data folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--mqtt", choices=("embedded", "mosquitto", "external"), default="embedded",
                   help="embedded amqtt broker (default), a managed Mosquitto, or an external broker")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--mqtt-tls", action="store_true",
                   help="MQTT over TLS (with --mqtt mosquitto), certificates from a development CA in DATA/tls")
    p.add_argument("--mqtt-client-certs", action="store_true",
                   help="with --mqtt-tls: every client also needs a certificate from that CA (issued at registration)")
    p.add_argument("--workers", type=int, default=1, help="build worker processes (default 1)")
    p.add_argument("--public-url", help="the URL devices download from (default: this server's)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole flow on one machine: server, 3 emulated devices, build, rollout")
    p.add_argument("model", help="a .tflite model (the Makefile passes MLPerf Tiny KWS)")
    p.add_argument("--data", default="build/demo", help="folder for the server and the devices (replaced)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("worker", help="run build workers (Huey consumer) on the server's data folder")
    p.add_argument("--data", help="data folder (default: env TINYMLAAS_DATA)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("agent", help="run one emulated device (A/B slots, self-test in QEMU or Renode)")
    p.add_argument("--server", default=os.environ.get("TINYMLAAS_SERVER", "http://127.0.0.1:8080"))
    p.add_argument("--token", help="API token to register with (first start only)")
    p.add_argument("--id", required=True, help="device id")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--group", default="default")
    p.add_argument("--state-dir", help="flash and state folder (default devices/ID)")
    p.add_argument("--board", choices=("qemu", "renode"), default="qemu",
                   help="the emulated board: the target's QEMU machine, or Renode's model of a real part of its class "
                   "(it then takes builds requested with --emulator renode)")
    p.set_defaults(func=cmd_agent)

    devices = sub.add_parser("devices", help="device registry").add_subparsers(dest="what", required=True)
    p = api(devices.add_parser("register", help="register a device; prints its MQTT credentials once"))
    p.add_argument("id")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--group", default="default")
    p.set_defaults(func=cmd_devices_register)
    p = api(devices.add_parser("list", help="list devices"))
    p.add_argument("--group")
    p.set_defaults(func=cmd_devices_list)

    p = api(devices.add_parser("rotate", help="give a device a new secret (shown once); the old one stops working"))
    p.add_argument("id")
    p.set_defaults(func=cmd_devices_rotate)

    orgs = sub.add_parser("orgs", help="organisations (tenants): an operator's commands on the server's data folder")
    orgs = orgs.add_subparsers(dest="what", required=True)
    p = orgs.add_parser("create", help="a new organisation and its first admin; prints the admin's token once")
    p.add_argument("name")
    p.add_argument("--admin", required=True, help="the admin's user name")
    p.add_argument("--expires-in-days", type=int, default=None, help="the admin token's lifetime (default: none)")
    p.add_argument("--data", default=os.environ.get("TINYMLAAS_DATA", "instance"), help="the server's data folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_orgs_create)

    p = api(sub.add_parser("whoami", help="who the token acts as: user, organisation, role, scopes"))
    p.set_defaults(func=cmd_whoami)

    users = sub.add_parser("users", help="users of your organisation").add_subparsers(dest="what", required=True)
    p = api(users.add_parser("create", help="add a user (admin); prints its first token once"))
    p.add_argument("name")
    p.add_argument("--role", choices=("admin", "developer", "viewer"), default="developer")
    p.set_defaults(func=cmd_users_create)
    p = api(users.add_parser("list", help="list the organisation's users"))
    p.set_defaults(func=cmd_users_list)

    tokens = sub.add_parser("tokens", help="API tokens").add_subparsers(dest="what", required=True)
    p = api(tokens.add_parser("create", help="a new token for yourself; printed once"))
    p.add_argument("name")
    p.add_argument("--scopes", help="comma-separated: read,build,deploy,admin (default: all of this token's)")
    p.add_argument("--expires-in-days", type=int, default=90, help="lifetime in days (default 90; 0: until revoked)")
    p.set_defaults(func=cmd_tokens_create)
    p = api(tokens.add_parser("list", help="your tokens (an admin: the organisation's)"))
    p.set_defaults(func=cmd_tokens_list)
    p = api(tokens.add_parser("revoke", help="revoke a token by id"))
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_tokens_revoke)

    models = sub.add_parser("models", help="uploaded models").add_subparsers(dest="what", required=True)
    p = api(models.add_parser("upload", help="upload a model (.tflite, .keras/.h5, or .onnx for the host targets)"))
    p.add_argument("file")
    p.set_defaults(func=cmd_models_upload)

    builds = sub.add_parser("builds", help="build jobs").add_subparsers(dest="what", required=True)
    p = api(builds.add_parser("request", help="queue a build of a model for a target"))
    p.add_argument("--model", type=int, required=True, help="model id")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--max-flash", type=_size)
    p.add_argument("--max-ram", type=_size)
    p.add_argument("--version", help="image version major.minor.revision[+build] (default 1.0.<build id>)")
    p.add_argument("--emulator", choices=("qemu", "renode"),
                   help="verify on and link for: qemu (default) or renode (Renode's model of a real part)")
    p.add_argument("--precision", choices=("float32", "float16"), help="host targets: the precision built")
    p.add_argument("--tune-trials", type=int, help="host targets: meta_schedule trials (a rebuild reuses them)")
    p.add_argument("--tune-minutes", type=float, help="host targets: a time budget for tuning")
    p.add_argument("--wait", action="store_true", help="wait for it, with a progress bar")
    p.set_defaults(func=cmd_builds_request)
    p = api(builds.add_parser("status", help="a build's state, progress and report"))
    p.add_argument("id", type=int)
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_builds_status)
    p = api(builds.add_parser("download", help="download a build artifact"))
    p.add_argument("id", type=int)
    p.add_argument("--artifact", default="image",
                   choices=("image", "firmware", "payload", "report", "selftest", "platformio"))
    p.add_argument("--out", "-o", required=True)
    p.set_defaults(func=cmd_builds_download)

    p = api(sub.add_parser("deploy", help="roll a build out to a device group, stage by stage"))
    p.add_argument("build", type=int, help="build id")
    p.add_argument("--group", default="default")
    p.add_argument("--stages", default="100", help="cumulative percentages, e.g. 10,50,100 (default 100)")
    p.add_argument("--success-threshold", type=float, default=1.0, help="fraction of a stage to advance (1.0)")
    p.add_argument("--error-threshold", type=float, default=0.1, help="fraction failed that halts (0.1)")
    p.add_argument("--job-timeout", type=int, default=1800,
                   help="seconds a notified device may stay silent before its job counts as failed (1800)")
    p.add_argument("--force", action="store_true", help="allow a downgrade")
    p.add_argument("--wait", action="store_true", help="follow the rollout until it ends")
    p.set_defaults(func=cmd_deploy)

    rollouts = sub.add_parser("rollouts", help="deployments").add_subparsers(dest="what", required=True)
    p = api(rollouts.add_parser("status", help="draw a rollout (default: the latest)"))
    p.add_argument("id", type=int, nargs="?")
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_rollouts_status)
    p = api(rollouts.add_parser("rollback", help="deploy the group's previous build again (forced)"))
    p.add_argument("id", type=int, help="the deployment to roll back")
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_rollouts_rollback)
    p = api(rollouts.add_parser("cancel", help="stop a rollout in progress: no further device is notified"))
    p.add_argument("id", type=int, help="the deployment to cancel")
    p.set_defaults(func=cmd_rollouts_cancel)



