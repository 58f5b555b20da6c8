"""`tinymlaas demo`: the whole story on one machine, with the embedded defaults.

A server (SQLite, in-process MQTT broker, one build worker), three emulated devices (Cortex-M4,
Cortex-M7, RV32), the MLPerf Tiny KWS model uploaded, built and verified per target, rolled out
over MQTT, and the fleet's final state; the dashboard's address and a sign-in token printed first, so that the
whole run can be watched there.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from .agent import Agent
from .broker import free_port
from .client import Client, draw_rollout
from .config import Settings
from .runtime import Server

DEVICES = [("kws-m4-01", "cortex-m4"), ("kws-m7-01", "cortex-m7"), ("kws-rv-01", "rv32imac")]


def run_demo(model: Path, data: Path, stay: bool = False) -> int:
    from tqdm import tqdm

    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    shutil.rmtree(data, ignore_errors=True)
    settings = Settings(data_dir=data / "server", mqtt_port=free_port())
    server = Server(settings, port=0, workers=1).start()
    agents: list[Agent] = []
    try:
        print(f"server {server.url}: SQLite {settings.database_url}, embedded MQTT broker on port "
              f"{settings.mqtt_port}, 1 build worker")
        print(f"dashboard: {server.url}/ui/login  sign in with the token {server.admin_token}")
        client = Client(server.url, server.admin_token)
        for device_id, target in DEVICES:
            agents.append(Agent(server.url, device_id, target, data / "devices" / device_id, server.admin_token,
                                group="demo").start())
        print(f"3 emulated devices registered and online: {', '.join(f'{i} ({t})' for i, t in DEVICES)}")

        m = client.upload_model(model)
        print(f"model {m['id']}: {m['name']}, {m['size']:,} B, {'int8' if m['quantized'] else 'float'}")
        builds = {t: client.request_build(m["id"], t) for _, t in DEVICES}
        for target, b in builds.items():
            with tqdm(total=100, desc=f"build {target:<10}", unit="%", file=sys.stderr, leave=False) as bar:
                def show(b):
                    bar.n = int(b["progress"] * 100)
                    bar.set_postfix_str(b["stage"] or b["state"])
                    bar.refresh()
                builds[target] = b = client.wait_build(b["id"], on_progress=show)
            if b["state"] != "done":
                print(f"build for {target} {b['state']}: {b['message']}")
                return 1
            r = b["report"]
            print(f"build {b['id']} {target:<10} {r['instructions']:>11,} instructions/inference, "
                  f"flash {r['sizes']['flash_model']:>7,} B, RAM {r['sizes']['ram_model']:>6,} B, "
                  f"{r['fidelity']['exact_fraction'] * 100:.0f}% bit-exact vs TFLite; signed image "
                  f"{r['image']['size']:,} B v{b['version']}")

        ok = True
        for target, b in builds.items():
            d = client.deploy(b["id"], group="demo")
            d = client.wait_deployment(d["id"], timeout=300)
            print(draw_rollout(d))
            ok &= d["state"] == "succeeded"

        print("\nfleet:")
        print(f"  {'device':<11} {'target':<10} {'state':<8} {'firmware':<9} {'slot':<5} instructions (self-test)")
        for a, dev in zip(agents, sorted(client.devices(), key=lambda d: [x for x, _ in DEVICES].index(d["id"]))):
            print(f"  {dev['id']:<11} {dev['target']:<10} {dev['state']:<8} {dev['firmware_version'] or '-':<9} "
                  f"{'AB'[a.booted.slot] if a.booted else '-':<5} {dev['instructions'] or 0:,}")
        print(f"\ndashboard: {server.url}/ui/login (token {server.admin_token})"
              + (": up until Ctrl-C" if stay else "; `tinymlaas demo MODEL --stay` keeps it up afterwards"))
        if stay:
            _wait_for_interrupt()
        return 0 if ok else 1
    finally:
        for a in agents:
            a.stop()
        server.stop()


def _wait_for_interrupt() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
