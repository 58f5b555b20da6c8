"""Slow clients against the live server on loopback: 80 sockets each holding a request whose headers never finish
made every other request wait (each held one of the HTTP server's 64 threads)."""

import socket
import threading
import time

import requests

from tests.helpers.fleet import start_server


def test_the_api_answers_while_80_clients_trickle_their_headers(tmp_path):
    server = start_server(tmp_path / "data", workers=0)
    stop, socks = threading.Event(), []
    try:
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", server.bound_port), timeout=5)
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: slow\r\n")  # the blank line never comes
            socks.append(s)

        def trickle():  # one more header byte a second per socket: no read timeout ever fires
            while not stop.wait(1.0):
                for s in socks:
                    try:
                        s.sendall(b"X")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1.5)
        started = time.monotonic()
        r = requests.get(f"{server.url}/api/v1/health", timeout=5)
        assert r.status_code == 200 and time.monotonic() - started < 5
        # and a body of its own: a request that writes
        r = requests.get(f"{server.url}/api/v1/openapi.json", timeout=5)
        assert r.status_code == 200
    finally:
        stop.set()
        for s in socks:
            s.close()
        server.stop()


def test_a_client_that_never_finishes_its_headers_is_cut_off(tmp_path):
    from server.runtime import HEADER_DEADLINE

    server = start_server(tmp_path / "data", workers=0)
    try:
        s = socket.create_connection(("127.0.0.1", server.bound_port), timeout=HEADER_DEADLINE + 10)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: slow\r\n")
        started = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert HEADER_DEADLINE - 1 < time.monotonic() - started < HEADER_DEADLINE + 5
        s.close()
    finally:
        server.stop()
