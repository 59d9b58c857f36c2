"""Shared fixtures: real mosquitto brokers on free loopback ports.

- `broker`: anonymous, started once per test session; `broker.host`, `broker.port`.
  Reconnect tests call `broker.stop()` / `broker.start()` / `broker.restart()`, which
  keep the same port.
- `running_broker`: the same broker, restarted first if an earlier test left it down;
  what most tests should ask for.
- `auth_broker`: wants username "ecg", password "s3cret".
- `tls_broker`: TLS only, self-signed certificate for 127.0.0.1 in `tls_broker.cafile`.
- `unused_port`: a loopback port nothing listens on.

Broker fixtures skip only when the `mosquitto` binary is missing (CI installs it).
Use a unique topic prefix per test: the session broker is shared.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mosquitto_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not always on a user's PATH.
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin"]))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """One mosquitto process; start/stop/restart on the same port."""

    host = "127.0.0.1"

    def __init__(self, binary: str, workdir: Path, anonymous: bool = True, extra: str = "") -> None:
        self.binary = binary
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous {str(anonymous).lower()}\npersistence false\n{extra}"
        )
        self.logfile = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert self._proc is None, "broker already running"
        with open(self.logfile, "ab") as log:
            self._proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.logfile.read_text()[-500:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    binary = _mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto)")
    b = Broker(binary, tmp_path_factory.mktemp("mosquitto"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (for connection-refused tests)."""
    return free_port()


@pytest.fixture
def running_broker(broker: Broker) -> Broker:
    """The session broker, started again if an earlier test left it stopped."""
    if not broker.running:
        broker.stop()  # reaps a process that died
        broker.start()
    return broker


def _stay_root() -> str:
    # Started as root (CI), mosquitto drops to user "mosquitto" before reading password and
    # certificate files, which then cannot see into pytest's private temp dir.
    return "user root\n" if os.geteuid() == 0 else ""


@pytest.fixture(scope="session")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker that wants username `ecg` and password `s3cret`."""
    binary = _mosquitto_binary()
    passwd = shutil.which("mosquitto_passwd")
    if binary is None or passwd is None:
        pytest.skip("mosquitto / mosquitto_passwd not found (apt-get install mosquitto)")
    workdir = tmp_path_factory.mktemp("mosquitto-auth")
    pwfile = workdir / "passwd"
    subprocess.run([passwd, "-b", "-c", str(pwfile), "ecg", "s3cret"], check=True, capture_output=True, timeout=10)
    b = Broker(binary, workdir, anonymous=False, extra=f"{_stay_root()}password_file {pwfile}\n")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A TLS-only broker with a fresh self-signed certificate for 127.0.0.1
    (`broker.cafile` is the certificate to trust)."""
    binary = _mosquitto_binary()
    openssl = shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("mosquitto / openssl not found")
    workdir = tmp_path_factory.mktemp("mosquitto-tls")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    b = Broker(binary, workdir, extra=f"{_stay_root()}certfile {cert}\nkeyfile {key}\n")
    b.cafile = cert  # type: ignore[attr-defined]
    b.start()
    try:
        yield b
    finally:
        b.stop()
