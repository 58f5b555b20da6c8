"""`tinymlaas builds`: request a build, follow it, download its artifacts."""

from __future__ import annotations

import sys

from tinymlaas.build.request import add_arguments, from_args

from .common import api_client, api_options, output


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
    client = api_client(args)
    # checked by the server (it knows the targets it builds for); the flags parse as `tinymlaas compile`'s do
    variant = None
    if args.variant:  # sent as JSON, checked by the server as `compile --variant` checks the file
        from tinymlaas.search.space import load_variant

        variant = load_variant(args.variant).to_dict()
    b = client.request_build(args.model, args.target, args.version, variant=variant,
                             **from_args(args, "service").to_dict())
    if args.wait:
        b = _wait_build(client, b["id"])
    output(b, args.json, _format_build)
    return 0 if b["state"] != "failed" else 1


def cmd_builds_status(args) -> int:
    client = api_client(args)
    b = _wait_build(client, args.id) if args.wait else client.build(args.id)
    output(b, args.json, _format_build)
    return 0


def cmd_builds_download(args) -> int:
    path = api_client(args).download_artifact(args.id, args.artifact, args.out)
    print(f"{path} ({path.stat().st_size:,} B)")
    return 0


def register(sub) -> None:
    builds = sub.add_parser("builds", help="build jobs").add_subparsers(dest="what", required=True)
    p = api_options(builds.add_parser("request", help="queue a build of a model for a target"))
    p.add_argument("--model", type=int, required=True, help="model id")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--version", help="image version major.minor.revision[+build] (default 1.0.<build id>)")
    add_arguments(p, "service")
    p.add_argument("--variant", metavar="JSON", help="build exactly this variant: a search's front.json (its chosen "
                   "point), a build's report.json or a variant's JSON, as `compile --variant` takes")
    p.add_argument("--wait", action="store_true", help="wait for it, with a progress bar")
    p.set_defaults(func=cmd_builds_request)
    p = api_options(builds.add_parser("status", help="a build's state, progress and report"))
    p.add_argument("id", type=int)
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_builds_status)
    p = api_options(builds.add_parser("download", help="download a build artifact"))
    p.add_argument("id", type=int)
    p.add_argument("--artifact", default="image",
                   choices=("image", "firmware", "payload", "report", "selftest", "platformio"))
    p.add_argument("--out", "-o", required=True)
    p.set_defaults(func=cmd_builds_download)
