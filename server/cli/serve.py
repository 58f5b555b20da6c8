"""Running the service: the server, build workers, one emulated device, and the whole flow as a demo."""

from __future__ import annotations

import logging
import os
from pathlib import Path


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


def cmd_demo(args) -> int:
    from server.demo import run_demo

    return run_demo(Path(args.model), Path(args.data), stay=args.stay)


def register(sub) -> None:
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
    p.add_argument("--stay", action="store_true", help="keep the server and devices up afterwards (the dashboard), "
                   "until Ctrl-C")
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
