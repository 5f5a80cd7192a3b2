"""Safe defaults: loopback-only endpoints, Kafka security settings on every client, bundles that
load without pickle and with verified checksums, no secret in logs, metrics, argv or manifests."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from export.bundle import sha256_file
from export.scorer import load_scorer
from stream.broker import free_port
from stream.events import PROBE_SESSION, click_value
from stream.process import start_worker, stop_worker
from stream.settings import Settings
from stream.watchdog import Watchdog, serve_http
from stream.worker import StreamWorker
from streamrec.errors import UserError
from tests.streamkit import answered, listening_sockets, send_all, streamrec
from tests.test_stream_support import gru_bundle, markov_bundle, metrics_text, stream_data, wait_for, worker_settings  # noqa: F401


STREAM = Path(__file__).resolve().parents[1] / "stream"
SECRET = "s3cr3t-Pa55word-9f2c"


def outward_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.broker
def test_worker_listens_on_loopback_only_and_leaks_no_secret(broker, markov_bundle, tmp_path):
    """A worker with a SASL user and password configured (unused: the test broker's listener is
    PLAINTEXT) at debug log level: one listening socket, on 127.0.0.1; the password nowhere to be read."""
    _, bundle = markov_bundle
    settings = worker_settings(broker, sasl_username="streamrec", sasl_password=SECRET, log_level="debug")
    assert settings.metrics_host == Settings().metrics_host == "127.0.0.1"  # the default, not set by the test
    log_path = tmp_path / "worker.log"
    worker = start_worker(settings, bundle, log_path)
    try:
        send_all(settings, [(PROBE_SESSION.encode(), click_value(PROBE_SESSION, "probe", 1.0))])
        assert wait_for(lambda: answered(settings) >= 1, timeout=60), log_path.read_text()[-2000:]
        assert listening_sockets(worker.pid) == {("127.0.0.1", settings.metrics_port)}  # no Faust web server, nothing else
        node = broker.cluster.nodes[0]  # Apache Kafka as `streamrec broker` runs it: clients and controller, on loopback only
        assert listening_sockets(broker.process.pid) == {("127.0.0.1", node.port), ("127.0.0.1", node.controller_port)}
        address = outward_address()
        if address is not None:
            with pytest.raises(OSError):
                socket.create_connection((address, settings.metrics_port), timeout=2).close()
        exposed = metrics_text(settings) + urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/healthz", timeout=5).read().decode()
        cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode(errors="replace")
    finally:
        assert stop_worker(worker) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text(errors="replace")
    assert "streamrec" in log and len(log) > 10_000  # the debug log really was written
    for where, text in (("log", log), ("/metrics and /healthz", exposed), ("command line", cmdline)):
        assert SECRET not in text, f"the SASL password appears in the worker's {where}"
    assert SECRET not in repr(settings)


@pytest.mark.parametrize("host", ["0.0.0.0", "::1"])
def test_the_endpoint_binds_what_it_is_told(host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    port = free_port()
    try:
        server = serve_http(host, port, CollectorRegistry(), Watchdog(30.0, CollectorRegistry()))
    except OSError as e:
        pytest.skip(f"cannot bind {host}: {e}")
    try:
        assert (host, port) in listening_sockets(os.getpid())
    finally:
        server.shutdown()
        server.server_close()


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=streamrec-test-ca"], check=True, capture_output=True)
    return cert, key


def _client_auth(client) -> dict:
    """What an aiokafka client will authenticate with (read from the client object before it connects)."""
    return {
        "security_protocol": client._security_protocol,
        "sasl_mechanism": client._sasl_mechanism if client._security_protocol.startswith("SASL") else None,
        "username": client._sasl_plain_username if client._security_protocol.startswith("SASL") else None,
        "password": client._sasl_plain_password if client._security_protocol.startswith("SASL") else None,
        "ssl_context": client._ssl_context,
    }


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
@pytest.mark.parametrize(
    "protocol,mechanism",
    [("SASL_SSL", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512"), ("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SSL", "PLAIN"), ("PLAINTEXT", "PLAIN")],
)
def test_kafka_security_settings_reach_every_client(markov_bundle, tmp_path, protocol, mechanism):
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    from stream.topics import producer

    cert, key = _certificate(tmp_path)
    sasl = protocol.startswith("SASL")
    tls = protocol.endswith("SSL")
    settings = Settings(
        broker="kafka://broker-a:9093,broker-b:9093",
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username="streamrec" if sasl else "",
        sasl_password=SECRET if sasl else "",
        ssl_cafile=str(cert),
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    scorer = load_scorer(markov_bundle[1])

    async def clients() -> dict[str, dict]:
        worker = StreamWorker(settings, scorer, partitions=3)
        faust_consumer = worker.app.consumer._thread
        built = {
            "replay/score-online producer": producer(settings),
            "topic admin": AIOKafkaAdminClient(**settings.kafka_kwargs()),
            "topic reader": AIOKafkaConsumer(**settings.kafka_kwargs()),
            "Faust producer (and its topic creation)": worker.app.producer._new_producer(),
            "Faust consumer": faust_consumer._create_worker_consumer(worker.app.transport),
            "Faust client consumer": faust_consumer._create_client_consumer(worker.app.transport),
        }
        out = {name: _client_auth(getattr(c, "client", None) or c._client) for name, c in built.items()}
        for c in built.values():
            if hasattr(c, "stop") and not isinstance(c, AIOKafkaAdminClient):
                await c.stop()
        return out

    for name, auth in asyncio.run(clients()).items():
        assert auth["security_protocol"] == protocol, name
        if sasl:
            assert (auth["sasl_mechanism"], auth["username"], auth["password"]) == (mechanism, "streamrec", SECRET), name
        context = auth["ssl_context"]
        if tls:
            assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname, name
            assert any(dict(x[0] for x in ca["subject"]).get("commonName") == "streamrec-test-ca" for ca in context.get_ca_certs()), name
        else:
            assert context is None, name


def test_every_kafka_client_in_the_stream_is_built_with_the_security_settings():
    """Static guard for clients added later: each aiokafka client made in stream/ takes
    ``**settings.kafka_kwargs()``, and the Faust app ``**settings.faust_credentials()``."""
    found = []
    for path in sorted(STREAM.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            expected = {"AIOKafkaProducer": "kafka_kwargs", "AIOKafkaConsumer": "kafka_kwargs", "AIOKafkaAdminClient": "kafka_kwargs", "AIOKafkaClient": "kafka_kwargs", "App": "faust_credentials"}.get(name)
            if expected is None:
                continue
            spread = [k.value for k in node.keywords if k.arg is None and isinstance(k.value, ast.Call)]
            assert any(isinstance(c.func, ast.Attribute) and c.func.attr == expected for c in spread), f"{path.name}:{node.lineno}: {name}(...) without **settings.{expected}()"
            found.append(f"{path.name}:{name}")
    assert {"topics.py:AIOKafkaAdminClient", "topics.py:AIOKafkaProducer", "topics.py:AIOKafkaConsumer", "worker.py:AIOKafkaProducer", "worker.py:App"} <= set(found)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / bundle.name
    shutil.copytree(bundle, out)
    return out


def _reseal(bundle: Path, name: str) -> None:
    """Rewrite the manifest's checksum of ``name``: an attacker who can write the whole bundle."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["markov", "gru"])
def test_a_tampered_bundle_is_refused(request, tmp_path, kind):
    bundle = request.getfixturevalue(f"{kind}_bundle")[1]
    load_scorer(bundle)  # the original loads
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in manifest["files"]:
        copy = _copy(bundle, tmp_path / f"flip-{name}")
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(UserError, match=f"{name} is corrupted"):
            load_scorer(copy)
    unlisted = _copy(bundle, tmp_path / "unlisted")
    m = json.loads((unlisted / "manifest.json").read_text())
    del m["files"][m["model_file"]]
    (unlisted / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="does not list"):
        load_scorer(unlisted)
    outside = _copy(bundle, tmp_path / "outside")
    m = json.loads((outside / "manifest.json").read_text())
    m["files"]["../manifest.json"] = "0" * 64
    (outside / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside the bundle"):
        load_scorer(outside)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_a_resealed_bundle_never_runs(markov_bundle, tmp_path):
    """Even with checksums forged to match, arrays holding pickles are not unpickled."""
    bundle = markov_bundle[1]
    marker = tmp_path / "code-ran"
    _Payload.marker = marker
    evil = np.array([_Payload()], dtype=object)
    model = _copy(bundle, tmp_path / "model")
    arrays = dict(np.load(model / "model.npz"))
    arrays[next(iter(arrays))] = evil
    np.savez(model / "model.npz", **arrays)
    _reseal(model, "model.npz")
    popularity = _copy(bundle, tmp_path / "popularity")
    np.save(popularity / "popularity.npy", evil, allow_pickle=True)
    _reseal(popularity, "popularity.npy")
    for tampered, name in ((model, "model.npz"), (popularity, "popularity.npy")):
        with pytest.raises(UserError, match=f"{name} holds pickled Python objects"):
            load_scorer(tampered)
    # the CLI says so in one line (exit status 2), no traceback
    verify = streamrec("bundle", "verify", str(model), timeout=60)
    assert verify.returncode == 2, verify.stderr
    assert verify.stderr.strip().splitlines() == [f"error: {model}: model.npz holds pickled Python objects, which streamrec never loads (a bundle holds plain numeric arrays only; re-export the model)"]
    assert not marker.exists()


def test_no_secret_in_a_bundle_exported_with_credentials_in_the_environment(stream_data, markov_bundle, tmp_path, monkeypatch):
    from export.exporter import export_run

    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("STREAMREC_SASL_USERNAME", "streamrec")
    out = tmp_path / "bundle"
    export_run(markov_bundle[0], out, data_dir=stream_data.path, parity_sessions=20, log=lambda _: None)
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path.name
