"""`tinymlaas devices`: the device registry."""

from __future__ import annotations

from .common import api_client, api_options, output


def cmd_devices_register(args) -> int:
    d = api_client(args).register_device(args.id, args.target, args.group)
    output(d, args.json, lambda d: f"registered {d['id']} ({d['target']}, group {d['group']}); MQTT user "
           f"{d['mqtt']['username']} password {d['mqtt']['password']} (shown once)")
    return 0


def cmd_devices_list(args) -> int:
    rows = api_client(args).devices(args.group)

    def fmt(rows):
        out = [f"{'device':<20} {'target':<11} {'group':<12} {'state':<10} {'firmware':<12} instructions"]
        out += [f"{d['id']:<20} {d['target']:<11} {d['group']:<12} {d['state']:<10} "
                f"{d['firmware_version'] or '-':<12} {d['instructions'] or '-'}" for d in rows]
        return "\n".join(out)
    output(rows, args.json, fmt)
    return 0


def cmd_devices_rotate(args) -> int:
    d = api_client(args).rotate_device_secret(args.id)
    output(d, args.json, lambda d: f"{d['username']}: new secret {d['password']} (shown once; the old one is refused)")
    return 0


def register(sub) -> None:
    devices = sub.add_parser("devices", help="device registry").add_subparsers(dest="what", required=True)
    p = api_options(devices.add_parser("register", help="register a device; prints its MQTT credentials once"))
    p.add_argument("id")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--group", default="default")
    p.set_defaults(func=cmd_devices_register)
    p = api_options(devices.add_parser("list", help="list devices"))
    p.add_argument("--group")
    p.set_defaults(func=cmd_devices_list)

    p = api_options(devices.add_parser("rotate", help="give a device a new secret (shown once); the old one stops working"))
    p.add_argument("id")
    p.set_defaults(func=cmd_devices_rotate)
