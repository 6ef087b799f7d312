"""Shared fixtures: real brokers on free loopback ports (mosquitto; amqtt fallback)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary

# CI (and a plain `pytest`) draws the same examples every run, so a red run is
# reproducible and a green one is not luck; HYPOTHESIS_PROFILE=explore draws anew.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NO_MOSQUITTO = "mosquitto binary not installed (apt-get install mosquitto; CI installs it)"


def _need_mosquitto() -> None:
    if mosquitto_binary() is None:
        pytest.skip(NO_MOSQUITTO)


@pytest.fixture
def mosquitto_broker(tmp_path):
    """A running mosquitto (EmbeddedBroker) with a generated plain config in tmp_path."""
    _need_mosquitto()
    broker = EmbeddedBroker(backend="mosquitto", workdir=tmp_path / "broker")
    with broker:
        yield broker


@pytest.fixture
def mosquitto(mosquitto_broker):
    """URL of a running mosquitto on a free 127.0.0.1 port."""
    return mosquitto_broker.url


@pytest.fixture
def amqtt_broker():
    pytest.importorskip("amqtt", reason="amqtt not installed (pip install amqtt)")
    with EmbeddedBroker(backend="amqtt") as broker:
        yield broker


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server cert for 127.0.0.1/localhost (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed: cannot make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    d = directory

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30, cwd=d)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "1", "-subj",
        "/CN=meshdl-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt")
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key")}


def make_client_cert(directory: Path, cn: str) -> dict[str, Path]:
    """A client certificate (CN = ``cn``) signed by the CA ``make_tls_files`` made in
    ``directory``: {"tls_cert", "tls_key"} for a PahoBus."""
    openssl = shutil.which("openssl")
    d = directory

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30, cwd=d)

    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={cn}", "-keyout", f"{cn}.key", "-out", f"{cn}.csr")
    run("x509", "-req", "-in", f"{cn}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-out", f"{cn}.crt")
    return {"tls_cert": d / f"{cn}.crt", "tls_key": d / f"{cn}.key"}
