"""Rollouts: `tinymlaas deploy` a build to a device group, and `tinymlaas rollouts` to follow, cancel or roll back."""

from __future__ import annotations

import sys

from .common import api_client, api_options, output


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


def _show_rollout(client, dep_id: int, as_json: bool, history: bool = False) -> int:
    from server.client import draw_history, draw_rollout

    d = client.deployment(dep_id)
    output(d, as_json, lambda d: draw_rollout(d) + ("\n" + draw_history(d) if history else ""))
    return 0 if d["state"] != "halted" else 1


def cmd_deploy(args) -> int:
    client = api_client(args)
    stages = [int(x) for x in args.stages.split(",")]
    d = client.deploy(args.build, args.group, stages, args.success_threshold, args.error_threshold, args.force,
                      args.job_timeout)
    if args.wait:
        d = _watch_rollout(client, d["id"])
    return _show_rollout(client, d["id"], args.json)


def cmd_rollouts_status(args) -> int:
    client = api_client(args)
    if args.id is None:
        deps = client.deployments()
        if not deps:
            print("no deployments")
            return 0
        args.id = deps[-1]["id"]
    if args.wait:
        _watch_rollout(client, args.id)
    return _show_rollout(client, args.id, args.json, args.history)


def cmd_rollouts_cancel(args) -> int:
    client = api_client(args)
    client.cancel_deployment(args.id)
    return _show_rollout(client, args.id, args.json)


def cmd_rollouts_rollback(args) -> int:
    client = api_client(args)
    d = client.rollback(args.id)
    if args.wait:
        _watch_rollout(client, d["id"])
    return _show_rollout(client, d["id"], args.json)


def register(sub) -> None:
    p = api_options(sub.add_parser("deploy", help="roll a build out to a device group, stage by stage"))
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
    p = api_options(rollouts.add_parser("status", help="draw a rollout (default: the latest)"))
    p.add_argument("id", type=int, nargs="?")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--history", action="store_true", help="also list what happened: stages, each device's outcome")
    p.set_defaults(func=cmd_rollouts_status)
    p = api_options(rollouts.add_parser("rollback", help="deploy the group's previous build again (forced)"))
    p.add_argument("id", type=int, help="the deployment to roll back")
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_rollouts_rollback)
    p = api_options(rollouts.add_parser("cancel", help="stop a rollout in progress: no further device is notified"))
    p.add_argument("id", type=int, help="the deployment to cancel")
    p.set_defaults(func=cmd_rollouts_cancel)
