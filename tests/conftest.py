"""Black-box test harness: every test talks HTTP to a real `sealdb` process.

The binary comes from $SEALDB_BIN (default: target/debug/sealdb). Each server gets its own
free loopback port and data directory; `Server.restart()` stops and starts the same data.
"""
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("SEALDB_BIN", ROOT / "target" / "debug" / "sealdb"))
# The original service's 0.17.0 OpenAPI document, dumped by tests/run.sh from the PyPI package.
ORIGINAL_SPEC = Path(os.environ.get("SEALDB_ORIGINAL_SPEC",
                                    ROOT / ".venvs" / "service17" / "openapi-0.17.0.json"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir, env=None, args=(), scheme="http", verify=None):
        self.scheme, self.verify = scheme, verify
        self.data_dir = Path(data_dir)
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.proc = None
        self.port = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self):
        # A restart keeps the port, as a real server would, so clients keep working.
        self.port = self.port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CYBORGDB_", "AUTO_TRAIN"))}
        env.update({"PORT": str(self.port), "CYBORGDB_DISK_PATH": str(self.data_dir),
                    "HOST": "127.0.0.1"})
        env.update(self.extra_env)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN), *self.args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sealdb exited with {self.proc.returncode}: "
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                if requests.get(self.url + "/v1/health", timeout=1, verify=self.verify).ok:
                    return self
            except (requests.ConnectionError, requests.exceptions.SSLError):
                time.sleep(0.05)
        raise RuntimeError("sealdb did not become healthy in 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def restart(self):
        self.stop()
        return self.start()

    def logs(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(env=None, args=(), name="data", **kw):
        s = Server(tmp_path / name, env=env, args=args, **kw)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One open (no root key) server shared by a module."""
    s = Server(tmp_path_factory.mktemp("srv") / "data").start()
    yield s
    s.stop()


class Api:
    """Tiny JSON helper: `api.post("/v1/x", {...})` returns (status, body)."""

    def __init__(self, url, api_key=None):
        self.url = url
        self.headers = {"X-API-Key": api_key} if api_key else {}

    def post(self, path, body, headers=None, **kw):
        r = requests.post(self.url + path, json=body, headers={**self.headers, **(headers or {})},
                          timeout=120, **kw)
        return r.status_code, (r.json() if r.content else None)

    def get(self, path, headers=None, **kw):
        r = requests.get(self.url + path, headers={**self.headers, **(headers or {})}, timeout=60, **kw)
        return r.status_code, (r.json() if r.content else None)


@pytest.fixture
def api(server):
    return Api(server.url)


def new_key():
    return secrets.token_hex(32)


def unique(prefix="ix"):
    return f"{prefix}-{secrets.token_hex(4)}"
