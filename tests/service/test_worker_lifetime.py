"""Build workers started by `serve` die with it, however it dies: a SIGKILLed server must not leave an orphan working
the queue next to the workers of the server started after it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.paths import REPO_ROOT as ROOT


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _dies_with_its_killed_server(script: str, ready=lambda: True) -> None:
    """Run `script` as the server (it prints its child's pid, then sleeps), SIGKILL it once `ready()`, and check that
    the child dies within 10 s."""
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(server.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(child)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_worker_dies_with_its_killed_server(tmp_path):
    _dies_with_its_killed_server(f"""
import time
from server import create_app
from server.config import Settings
from server.runtime import start_worker
settings = Settings(data_dir=r"{tmp_path}")
create_app(settings)
print(start_worker(settings).pid, flush=True)
time.sleep(120)
""", ready=lambda: "consumer" in (tmp_path / "worker.log").read_text(errors="replace").lower())  # its queue consumer


def test_a_managed_mosquitto_dies_with_its_killed_server(tmp_path):
    """A SIGKILLed `serve` left its Mosquitto running under pid 1, with the old port and password file: the next
    server could not bind, and the old secrets kept logging in."""
    _dies_with_its_killed_server(f"""
import time
from server.broker import MosquittoBroker, free_port
b = MosquittoBroker(r"{tmp_path}", lambda: {{}}, port=free_port())
b.start()
print(b.proc.pid, flush=True)
time.sleep(120)
""")


def test_a_broker_already_on_the_port_is_named_at_start(tmp_path):
    """`serve` on a port another broker holds restarted its own every 2 s forever: now it stops with one line
    naming the port and the process that holds it."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "tinymlaas", "serve", "--data", str(tmp_path / "d"), "--port", "0",
                            "--mqtt", "mosquitto", "--mqtt-port", str(port), "--workers", "0"],
                           check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        holder.close()
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("tinymlaas:")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and f"pid {os.getpid()}" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
