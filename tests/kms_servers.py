"""Real KMS servers for the KMS tests, on free loopback ports: an OpenBao dev server (the Vault
API with the transit engine) and moto's AWS KMS. tests/run.sh installs both into venvs and
names their binaries in SEALDB_BAO_BIN and SEALDB_MOTO_BIN.

Both keep their state in memory, so an outage is made by stopping the process (SIGSTOP) and
resuming it (SIGCONT): the server under test sees a KMS that accepts connections and never
answers, then answers again with every key intact.
"""
import base64
import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
BAO_BIN = Path(os.environ.get("SEALDB_BAO_BIN", ROOT / ".venvs" / "bao" / "bin" / "bao"))
MOTO_BIN = Path(os.environ.get("SEALDB_MOTO_BIN", ROOT / ".venvs" / "moto" / "bin" / "moto_server"))


def _wait(url, deadline_s=30, ok=(200,)):
    deadline = time.time() + deadline_s
    last = None
    while time.time() < deadline:
        try:
            r = requests.get(url, timeout=1)
            if r.status_code in ok:
                return
            last = r.status_code
        except requests.ConnectionError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up: {last}")


class _Process:
    def __init__(self, argv, log_path, env=None):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class OpenBao(_Process):
    """`bao server -dev` with transit mounted; helpers speak its HTTP API with the root token."""

    TOKEN = "root"

    def __init__(self, workdir):
        assert BAO_BIN.exists(), f"OpenBao not found at {BAO_BIN} (tests/run.sh installs it)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(BAO_BIN), "server", "-dev", f"-dev-root-token-id={self.TOKEN}",
                          f"-dev-listen-address=127.0.0.1:{self.port}"],
                         Path(workdir) / "openbao.log",
                         env={"HOME": str(workdir), "BAO_ADDR": "", "VAULT_ADDR": ""})
        _wait(self.url + "/v1/sys/health")
        self.call("POST", "/v1/sys/mounts/transit", {"type": "transit"})

    def call(self, method, path, body=None, token=None):
        r = requests.request(method, self.url + path, json=body, timeout=10,
                             headers={"X-Vault-Token": token or self.TOKEN})
        assert r.status_code in (200, 204), (path, r.status_code, r.text)
        return r.json() if r.content else None

    def create_key(self, name):
        self.call("POST", f"/v1/transit/keys/{name}", {})

    def rotate(self, name):
        self.call("POST", f"/v1/transit/keys/{name}/rotate", {})

    def key(self, name):
        return self.call("GET", f"/v1/transit/keys/{name}")["data"]

    def set_min_decryption_version(self, name, version):
        self.call("POST", f"/v1/transit/keys/{name}/config", {"min_decryption_version": version})

    def decrypt(self, key, ciphertext, associated_data):
        data = self.call("POST", f"/v1/transit/decrypt/{key}", {
            "ciphertext": ciphertext,
            "associated_data": base64.b64encode(associated_data).decode()})["data"]
        return base64.b64decode(data["plaintext"])

    def approle(self, key, role, token_ttl="1h"):
        """An AppRole allowed only to wrap/unwrap with `key` (and read it): (role_id, secret_id)."""
        if "approle/" not in self.call("GET", "/v1/sys/auth")["data"]:
            self.call("POST", "/v1/sys/auth/approle", {"type": "approle"})
        policy = "\n".join([
            f'path "transit/encrypt/{key}" {{ capabilities = ["update"] }}',
            f'path "transit/decrypt/{key}" {{ capabilities = ["update"] }}',
            f'path "transit/keys/{key}" {{ capabilities = ["read"] }}'])
        self.call("PUT", f"/v1/sys/policies/acl/{role}", {"policy": policy})
        self.call("POST", f"/v1/auth/approle/role/{role}", {
            "token_policies": [role], "token_ttl": token_ttl, "token_max_ttl": token_ttl})
        role_id = self.call("GET", f"/v1/auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.call("POST", f"/v1/auth/approle/role/{role}/secret-id", {})["data"]["secret_id"]
        return role_id, secret_id

    def slot(self, key, **extra):
        return {"provider": "vault", "address": self.url, "key_name": key, "token": self.TOKEN,
                "timeout_seconds": 2, **extra}


class Moto(_Process):
    """`moto_server`; keys are made through its KMS JSON API (moto does not check signatures)."""

    def __init__(self, workdir):
        assert MOTO_BIN.exists(), f"moto_server not found at {MOTO_BIN} (tests/run.sh installs it)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(self.port)],
                         Path(workdir) / "moto.log")
        _wait(self.url + "/moto-api/")

    def kms(self, action, body):
        r = requests.post(self.url + "/", json=body, timeout=10, headers={
            "X-Amz-Target": f"TrentService.{action}",
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, "
                             "SignedHeaders=host, Signature=0"})
        assert r.status_code == 200, (action, r.status_code, r.text)
        return r.json()

    def create_key(self, alias=None):
        key_id = self.kms("CreateKey", {})["KeyMetadata"]["KeyId"]
        if alias:
            self.kms("CreateAlias", {"AliasName": alias, "TargetKeyId": key_id})
        return key_id

    def disable_key(self, key_id):
        self.kms("DisableKey", {"KeyId": key_id})

    def enable_key(self, key_id):
        self.kms("EnableKey", {"KeyId": key_id})

    def slot(self, key_id, **extra):
        return {"provider": "aws-kms", "key_id": key_id, "region": "us-east-1",
                "endpoint": self.url, "timeout_seconds": 2, **extra}

    # What a SealDB process needs in its environment to reach moto.
    ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def registry_yaml(slots):
    """A cyborgdb.yaml with `kms.registry` holding `slots` ({name: {field: value}})."""
    lines = ["kms:", "  registry:"]
    for name, fields in slots.items():
        lines.append(f"    {name}:")
        for k, v in fields.items():
            lines.append(f"      {k}: {v}")
    return "\n".join(lines) + "\n"
