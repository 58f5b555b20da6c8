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


def test_a_worker_dies_with_its_killed_server(tmp_path):
    server = subprocess.Popen([sys.executable, "-c", f"""
import time
from server import create_app
from server.config import Settings
from server.runtime import start_worker
settings = Settings(data_dir=r"{tmp_path}")
create_app(settings)
print(start_worker(settings).pid, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    worker = int(server.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while "consumer" not in (tmp_path / "worker.log").read_text(errors="replace").lower() and \
                time.monotonic() < deadline:  # running its queue consumer
            time.sleep(0.2)
        assert _alive(worker)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
