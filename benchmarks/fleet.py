"""Fleet load: rollout time for N emulated devices, and API throughput and latency (p50/p99) under concurrent
clients; one JSON.

Usage: python benchmarks/fleet.py [--models DIR] [--agents 50,200] [--large 1000] [--clients 16] [--out FILE]
(`make bench` runs it with --large 1000.)

Every device is a real agent (own MQTT login, HTTP download with its own credentials, image checks,
A/B slot write, QEMU self-test of the new image: every device runs it, none is sampled), all of them threads of
this process; the server is `tinymlaas serve` in a process of its own, as it runs in production (the real app:
cheroot thread pool, SQLite WAL, one Huey worker), with each MQTT broker in turn; the large fleet on Mosquitto only
(the production broker). The API clients are threads of this process too: the server does not share an
interpreter with its clients or devices, which on a 2-core machine still share its cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.broker import MosquittoBroker, free_port
from server.client import Client
from tests.helpers.fleet import build, start_agents
from tinymlaas import __version__

logging.getLogger("amqtt").setLevel(logging.CRITICAL)


class ServerProcess:
    """`tinymlaas serve` in a process of its own: url and admin_token, as tests/helpers/fleet.start_server's Server."""

    def __init__(self, data: Path, mqtt: str = "embedded", workers: int = 1):
        self.port = free_port()
        data.mkdir(parents=True, exist_ok=True)
        self.log = open(data.parent / f"{data.name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinymlaas", "serve", "--data", str(data), "--port", str(self.port), "--mqtt", mqtt,
             "--mqtt-port", str(free_port()), "--workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: see {self.log.name}")
            time.sleep(0.2)
        self.admin_token = (data / "admin.token").read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve stops its broker and workers on ^C
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def rollout(root: Path, model: Path, broker: str, n: int) -> dict:
    server = ServerProcess(root / f"{broker}-{n}", mqtt=broker)
    agents = []
    try:
        client = Client(server.url, server.admin_token)
        b = build(client, model)
        t0 = time.monotonic()
        agents = start_agents(server, root / f"{broker}-{n}-devices", [f"d{i:04d}" for i in range(n)], group="bench",
                              connect_timeout=max(120, n))
        connect_s = time.monotonic() - t0
        t1 = time.monotonic()
        d = client.wait_deployment(client.deploy(b["id"], group="bench", stages=[10, 50, 100])["id"], timeout=1800)
        seconds = time.monotonic() - t1
        return {"broker": broker, "agents": n, "state": d["state"], "counts": d["summary"]["counts"],
                "register_and_connect_s": round(connect_s, 2), "rollout_s": round(seconds, 2),
                "devices_per_s": round(n / seconds, 1), "image_bytes": b["report"]["image"]["size"]}
    finally:
        for a in agents:
            a.stop()
        server.stop()


def api_load(root: Path, threads: int = 16, seconds: float = 5.0, devices: int = 200) -> dict:
    """Each endpoint in turn, `threads` clients calling it back to back: requests/s, errors, latency p50/p99."""
    server = ServerProcess(root / "api", workers=0)
    try:
        client = Client(server.url, server.admin_token)
        for i in range(devices):
            client.register_device(f"api{i:04d}", "cortex-m4", "api")
        endpoints = {
            "GET /devices/{id}": lambda s, i: s.get(f"{server.url}/api/v1/devices/api{i % devices:04d}"),
            "GET /devices?group (200 rows)": lambda s, i: s.get(f"{server.url}/api/v1/devices?group=api"),
            "GET /health": lambda s, i: s.get(f"{server.url}/api/v1/health"),
        }
        out = {}
        for name, call in endpoints.items():
            done, errors, stop = [0] * threads, [0] * threads, threading.Event()
            latencies: list[list[float]] = [[] for _ in range(threads)]

            def worker(k, call=call, done=done, errors=errors, stop=stop, latencies=latencies):
                s = requests.Session()
                s.headers["Authorization"] = f"Bearer {server.admin_token}"
                i = k
                while not stop.is_set():
                    t = time.perf_counter()
                    r = call(s, i)
                    latencies[k].append(time.perf_counter() - t)
                    if r.status_code == 200:
                        done[k] += 1
                    else:
                        errors[k] += 1
                    i += threads

            ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
            t0 = time.monotonic()
            for t in ts:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in ts:
                t.join()
            elapsed = time.monotonic() - t0
            ms = sorted(1000 * x for per in latencies for x in per)
            cuts = statistics.quantiles(ms, n=100)
            out[name] = {"requests_per_s": round(sum(done) / elapsed, 1), "errors": sum(errors),
                         "p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2)}
        return {"threads": threads, "seconds": seconds, "endpoints": out}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--agents", default="50,200")
    ap.add_argument("--large", type=int, default=0, help="one more rollout this size, on Mosquitto (default none; "
                    "`make bench` asks for 1,000)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent API clients (default 16)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet.json"))
    args = ap.parse_args()
    model = Path(args.models) / "ad01_int8.tflite"
    brokers = ["embedded"] + (["mosquitto"] if MosquittoBroker.binary() else [])
    results = {"tinymlaas": __version__, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                     "platform": platform.platform()},
               "model": model.name, "rollouts": [], "api": None}
    with tempfile.TemporaryDirectory(prefix="tinymlaas-fleet-") as tmp:
        runs = [(broker, int(n)) for broker in brokers for n in args.agents.split(",")]
        if args.large and "mosquitto" in brokers:
            runs.append(("mosquitto", args.large))
        for broker, n in runs:
            r = rollout(Path(tmp), model, broker, n)
            print(json.dumps(r), flush=True)
            results["rollouts"].append(r)
        results["api"] = api_load(Path(tmp), threads=args.clients)
        print(json.dumps(results["api"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
