"""Interop: a non-Rust gRPC stack (Python grpcio, BoringSSL) against dsrelay.

Starts the real `dsrelay-registry` and `dsrelay-processor` binaries over mutual TLS with a
development PKI made by `dsrctl pki init`, then, from Python only:

* checks grpc.health.v1 on both services;
* discovers the registry's API through server reflection (v1), builds the message classes
  from the returned descriptors (no generated code), submits an erasure request as the
  partner `crm` and follows it until the pair reports it COMPLETED;
* checks that connections without a client certificate, or with one from another CA, are
  refused;
* submits a return of data for a customer of a small SQLite database (made here, read by the
  SQL connector), waits until the package is at the registry and downloads it through
  PackageService's server stream, checking every chunk's offset and every file's size and
  SHA-256 against the manifest.

Run with scripts/interop.sh, which builds the binaries and installs requirements.txt.
Binaries are taken from DSRELAY_BIN_DIR (default <repo>/target/debug).
"""

from __future__ import annotations

import datetime
import json
import os
import hashlib
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

# grpcio-reflection ships only the v1alpha protos. grpc.reflection.v1 has the same messages
# (field for field, same numbers), so the v1alpha classes serialise v1 calls exactly.
from grpc_reflection.v1alpha import reflection_pb2

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("DSRELAY_BIN_DIR") or REPO / "target" / "debug")

STARTUP_TIMEOUT_S = 30.0
COMPLETION_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 10.0

REQUEST_SERVICE = "dsrelay.v1.RequestService"
ACK_SERVICE = "dsrelay.v1.AcknowledgementService"
PROCESSOR_SERVICE = "dsrelay.v1.ProcessorService"
PACKAGE_SERVICE = "dsrelay.v1.PackageService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

PARTNER_CRM = "spiffe://dsrelay.dev/partner/crm"
OPERATOR_OPS = "spiffe://dsrelay.dev/operator/ops"
PROCESSOR_ID = "spiffe://dsrelay.dev/processor/payroll-bureau"
REGISTRY_ID = "spiffe://dsrelay.dev/registry/controller"

# The one customer of the SQLite database the `crm-db` subprocessor holds.
CUSTOMER_EMAIL = "aino.asiakas@example.fi"
CUSTOMER_NAME = "Aino Asiakas"


# ---------------------------------------------------------------------------------------------
# The running pair
# ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    dir: Path
    pki: Path
    registry_port: int
    processor_port: int

    def read(self, name: str) -> bytes:
        return (self.pki / name).read_bytes()

    def credentials(self, stem: str | None) -> grpc.ChannelCredentials:
        """mTLS credentials presenting `<stem>.pem`; `None` presents no client certificate."""
        if stem is None:
            return grpc.ssl_channel_credentials(root_certificates=self.read("ca.pem"))
        return grpc.ssl_channel_credentials(
            root_certificates=self.read("ca.pem"),
            private_key=self.read(f"{stem}.key"),
            certificate_chain=self.read(f"{stem}.pem"),
        )

    def channel(self, port: int, stem: str | None) -> grpc.Channel:
        return grpc.secure_channel(f"localhost:{port}", self.credentials(stem))

    def registry(self, stem: str = "operator") -> grpc.Channel:
        return self.channel(self.registry_port, stem)

    def processor(self, stem: str = "registry") -> grpc.Channel:
        return self.channel(self.processor_port, stem)


def _binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"{path} is missing: build it first (cargo build --bins -p dsrelay-registry "
            f"-p dsrelay-processor -p dsrctl, as scripts/interop.sh does) or point "
            f"DSRELAY_BIN_DIR at the folder holding it",
            pytrace=False,
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value) -> str:
    """A TOML inline value; JSON strings, numbers and arrays of them are valid TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def _tls_table(pki: Path, stem: str) -> str:
    return (
        "[tls]\n"
        f"ca = {_toml(str(pki / 'ca.pem'))}\n"
        f"cert = {_toml(str(pki / f'{stem}.pem'))}\n"
        f"key = {_toml(str(pki / f'{stem}.key'))}\n"
    )


def _registry_config(tmp: Path, pki: Path, rport: int, pport: int) -> str:
    return "\n".join(
        [
            f"listen = {_toml(f'127.0.0.1:{rport}')}",
            f"database_url = {_toml(f'sqlite://{tmp}/registry.db')}",
            'identity_hash_key = "interop test key"',
            "",
            _tls_table(pki, "registry"),
            "[[identities]]",
            f"identity = {_toml(PARTNER_CRM)}",
            'role = "partner"',
            'name = "crm"',
            "",
            "[[identities]]",
            f"identity = {_toml(OPERATOR_OPS)}",
            'role = "operator"',
            'name = "ops"',
            "",
            "[[processors]]",
            'name = "payroll-bureau"',
            f"endpoint = {_toml(f'https://localhost:{pport}')}",
            f"identity = {_toml(PROCESSOR_ID)}",
            'categories = ["marketing", "contact"]',
            "",
            "[delivery]",
            "poll_interval_ms = 200",
            "call_timeout_ms = 5000",
            "backoff = { initial_ms = 100, max_ms = 1000 }",
            "",
            # Every registry signs checkpoints of its audit trail; the development PKI
            # holds the key.
            "[audit]",
            f"checkpoint_key = {_toml(str(pki / 'registry-signing.key'))}",
            f"checkpoint_file = {_toml(str(tmp / 'registry-audit-checkpoints.jsonl'))}",
            "",
        ]
    )


def _processor_config(tmp: Path, pki: Path, rport: int, pport: int) -> str:
    return "\n".join(
        [
            f"listen = {_toml(f'127.0.0.1:{pport}')}",
            f"database_url = {_toml(f'sqlite://{tmp}/processor.db')}",
            'identity_hash_key = "interop test key"',
            "",
            _tls_table(pki, "processor"),
            # Every processor signs checkpoints of its own audit trail too; the development
            # PKI's processor key serves.
            "[audit]",
            f"checkpoint_key = {_toml(str(pki / 'processor-signing.key'))}",
            f"checkpoint_file = {_toml(str(tmp / 'processor-audit-checkpoints.jsonl'))}",
            "",
            "[[controllers]]",
            'name = "controller"',
            f"identity = {_toml(REGISTRY_ID)}",
            f"registry_endpoint = {_toml(f'https://localhost:{rport}')}",
            "",
            "[[subprocessors]]",
            'name = "mail"',
            'categories = ["marketing"]',
            'connector = { type = "noop" }',
            "",
            "[[subprocessors]]",
            'name = "crm-db"',
            'categories = ["contact"]',
            "connector = "
            + _toml(
                {
                    "type": "sql",
                    "url": f"sqlite://{tmp}/crm.db",
                    "tables": [
                        {
                            "table": "customers",
                            "action": "delete",
                            "match": {"email": "email"},
                            "export": ["id", "email", "name"],
                        }
                    ],
                }
            ),
            "",
            "[tasks]",
            "poll_interval_ms = 200",
            "backoff = { initial_ms = 100, max_ms = 1000 }",
            "",
            "[acks]",
            "poll_interval_ms = 200",
            "call_timeout_ms = 5000",
            "backoff = { initial_ms = 100, max_ms = 1000 }",
            "",
        ]
    )


def _clean_env() -> dict[str, str]:
    """The environment without variables that would override the config files."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DSRELAY_REGISTRY", "DSRELAY_PROCESSOR"))
    }
    env.setdefault("RUST_LOG", "info")
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_accepting(proc: subprocess.Popen, port: int, log: Path, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"{name} exited with status {proc.returncode} during startup; log:\n"
                f"{_tail(log)}",
                pytrace=False,
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(
        f"{name} did not accept connections on 127.0.0.1:{port} within "
        f"{STARTUP_TIMEOUT_S:.0f} s; log:\n{_tail(log)}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry_bin = _binary("dsrelay-registry")
    processor_bin = _binary("dsrelay-processor")
    dsrctl_bin = _binary("dsrctl")

    tmp = tmp_path_factory.mktemp("interop")
    pki = tmp / "pki"
    init = subprocess.run(
        [str(dsrctl_bin), "pki", "init", "--dir", str(pki)],
        cwd=tmp,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if init.returncode != 0 or not (pki / "ca.pem").is_file():
        pytest.fail(
            f"dsrctl pki init failed (status {init.returncode}):\n{init.stdout}{init.stderr}",
            pytrace=False,
        )

    with sqlite3.connect(tmp / "crm.db") as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT)")
        db.execute(
            "INSERT INTO customers (id, email, name) VALUES (7, ?, ?)",
            (CUSTOMER_EMAIL, CUSTOMER_NAME),
        )
    db.close()

    rport, pport = _free_port(), _free_port()
    while pport == rport:
        pport = _free_port()
    (tmp / "registry.toml").write_text(_registry_config(tmp, pki, rport, pport))
    (tmp / "processor.toml").write_text(_processor_config(tmp, pki, rport, pport))

    procs: list[subprocess.Popen] = []
    logs: list[tuple[str, Path]] = []
    try:
        for name, binary, config, port in [
            ("dsrelay-processor", processor_bin, "processor.toml", pport),
            ("dsrelay-registry", registry_bin, "registry.toml", rport),
        ]:
            log = tmp / f"{name}.log"
            logs.append((name, log))
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [str(binary), "--config", str(tmp / config)],
                    cwd=tmp,
                    env=_clean_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            _wait_accepting(proc, port, log, name)
        yield Stack(dir=tmp, pki=pki, registry_port=rport, processor_port=pport)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if os.environ.get("DSRELAY_INTEROP_SHOW_LOGS"):
            for name, log in logs:
                print(f"--- {name} log ---\n{_tail(log, 200)}")


# ---------------------------------------------------------------------------------------------
# Health checking
# ---------------------------------------------------------------------------------------------


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S).status


@pytest.mark.parametrize("service", ["", REQUEST_SERVICE, ACK_SERVICE])
def test_registry_health_serving(stack, service):
    with stack.registry("operator") as ch:
        assert _health(ch, service) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["", PROCESSOR_SERVICE])
def test_processor_health_serving(stack, service):
    with stack.processor("registry") as ch:
        assert _health(ch, service) == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_not_found(stack):
    with stack.registry("operator") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _health(ch, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Reflection and dynamic calls
# ---------------------------------------------------------------------------------------------


class Reflection:
    """A minimal grpc.reflection.v1 client over one channel."""

    def __init__(self, channel: grpc.Channel):
        self._call = channel.stream_stream(
            REFLECTION_V1_METHOD,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )

    def ask(self, **request) -> reflection_pb2.ServerReflectionResponse:
        responses = list(
            self._call(
                iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=RPC_TIMEOUT_S
            )
        )
        assert len(responses) == 1, f"one answer expected for {request}, got {responses}"
        response = responses[0]
        if response.HasField("error_response"):
            e = response.error_response
            raise LookupError(f"reflection error for {request}: {e.error_code} {e.error_message}")
        return response

    def services(self) -> list[str]:
        return [s.name for s in self.ask(list_services="").list_services_response.service]

    def _files(self, **request) -> list[descriptor_pb2.FileDescriptorProto]:
        raw = self.ask(**request).file_descriptor_response.file_descriptor_proto
        return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in raw]

    def pool_for_symbol(self, symbol: str) -> descriptor_pool.DescriptorPool:
        """A fresh pool holding the file defining `symbol` and all it imports, as served."""
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for f in self._files(file_containing_symbol=symbol):
            files.setdefault(f.name, f)
        # Fetch any import the server did not send along.
        missing = [d for f in list(files.values()) for d in f.dependency if d not in files]
        while missing:
            name = missing.pop()
            if name in files:
                continue
            for f in self._files(file_by_filename=name):
                files.setdefault(f.name, f)
            missing.extend(d for f in files.values() for d in f.dependency if d not in files)

        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

        for name in files:
            add(name)
        return pool


class DynamicService:
    """Calls a service's unary methods with message classes built from its descriptors."""

    def __init__(self, channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, name: str):
        self.pool = pool
        self.descriptor = pool.FindServiceByName(name)
        self._channel = channel

    def message(self, full_name: str):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def enum(self, full_name: str, value: str) -> int:
        return self.pool.FindEnumTypeByName(full_name).values_by_name[value].number

    def enum_name(self, full_name: str, number: int) -> str:
        return self.pool.FindEnumTypeByName(full_name).values_by_number[number].name

    def input(self, method: str):
        return message_factory.GetMessageClass(
            self.descriptor.FindMethodByName(method).input_type
        )

    def call(self, method: str, request):
        m = self.descriptor.FindMethodByName(method)
        assert not m.client_streaming and not m.server_streaming, f"{method} is not unary"
        output = message_factory.GetMessageClass(m.output_type)
        rpc = self._channel.unary_unary(
            f"/{self.descriptor.full_name}/{m.name}",
            request_serializer=lambda msg: msg.SerializeToString(),
            response_deserializer=output.FromString,
        )
        return rpc(request, timeout=RPC_TIMEOUT_S)

    def stream(self, method: str, request):
        """Calls a server-streaming method; iterates over its messages."""
        m = self.descriptor.FindMethodByName(method)
        assert not m.client_streaming and m.server_streaming, f"{method} is not server-streaming"
        output = message_factory.GetMessageClass(m.output_type)
        rpc = self._channel.unary_stream(
            f"/{self.descriptor.full_name}/{m.name}",
            request_serializer=lambda msg: msg.SerializeToString(),
            response_deserializer=output.FromString,
        )
        return rpc(request, timeout=COMPLETION_TIMEOUT_S)


def test_reflection_lists_services(stack):
    # Each caller sees only the services its role may call: an operator the request API, a
    # processor the acknowledgement API; both see health and reflection.
    with stack.registry("operator") as ch:
        services = set(Reflection(ch).services())
    for expected in [REQUEST_SERVICE, HEALTH_SERVICE, REFLECTION_V1]:
        assert expected in services, f"{expected} not listed by reflection: {sorted(services)}"
    assert ACK_SERVICE not in services, f"an operator sees {ACK_SERVICE}: {sorted(services)}"
    with stack.registry("processor") as ch:
        services = set(Reflection(ch).services())
    for expected in [ACK_SERVICE, HEALTH_SERVICE, REFLECTION_V1]:
        assert expected in services, f"{expected} not listed by reflection: {sorted(services)}"
    assert REQUEST_SERVICE not in services, f"a processor sees {REQUEST_SERVICE}: {sorted(services)}"


def test_processor_reflection_lists_services(stack):
    with stack.processor("registry") as ch:
        services = set(Reflection(ch).services())
    for expected in [PROCESSOR_SERVICE, HEALTH_SERVICE, REFLECTION_V1]:
        assert expected in services, f"{expected} not listed by reflection: {sorted(services)}"


def test_stock_python_reflection_client_v1alpha(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with stack.registry("operator") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert REQUEST_SERVICE in set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        assert pool.FindServiceByName(REQUEST_SERVICE).FindMethodByName("Submit")


def _erasure_request(api: DynamicService, key: str, with_identity: bool = True):
    SubmitRequest = api.input("Submit")
    SubjectIdentity = api.message("dsrelay.v1.SubjectIdentity")
    identities = []
    if with_identity:
        identities.append(
            SubjectIdentity(
                type=api.enum("dsrelay.v1.IdentityType", "IDENTITY_TYPE_EMAIL"),
                encoding=api.enum("dsrelay.v1.IdentityEncoding", "IDENTITY_ENCODING_RAW"),
                value="interop.subject@example.com",
            )
        )
    return SubmitRequest(
        kind=api.enum("dsrelay.v1.RequestKind", "REQUEST_KIND_ERASURE"),
        identities=identities,
        idempotency_key=key,
        note="python grpcio interop test",
    )


def test_reflection_discovers_and_submit_completes(stack):
    with stack.registry("partner-crm") as ch:
        pool = Reflection(ch).pool_for_symbol(REQUEST_SERVICE)
        api = DynamicService(ch, pool, REQUEST_SERVICE)
        assert {"Submit", "Get", "List", "Watch", "Cancel"} <= set(api.descriptor.methods_by_name)

        key = f"interop-{uuid.uuid4().hex}"
        submitted = api.call("Submit", _erasure_request(api, key))
        assert submitted.request_id
        assert not submitted.deduplicated
        assert list(submitted.routed_to) == ["payroll-bureau"]
        assert len(submitted.trace_id) == 32

        # The same key and body again: the first request, deduplicated.
        again = api.call("Submit", _erasure_request(api, key))
        assert again.request_id == submitted.request_id
        assert again.deduplicated

        GetRequest = api.input("Get")
        completed = api.enum("dsrelay.v1.RequestState", "REQUEST_STATE_COMPLETED")
        terminal_bad = {
            api.enum("dsrelay.v1.RequestState", s)
            for s in ["REQUEST_STATE_FAILED", "REQUEST_STATE_CANCELLED"]
        }
        deadline = time.monotonic() + COMPLETION_TIMEOUT_S
        while True:
            request = api.call("Get", GetRequest(request_id=submitted.request_id))
            assert request.request_id == submitted.request_id
            assert request.idempotency_key == key
            assert request.partner == "crm"
            if request.state == completed:
                break
            state = api.enum_name("dsrelay.v1.RequestState", request.state)
            assert request.state not in terminal_bad, f"request ended {state}: {request}"
            assert time.monotonic() < deadline, (
                f"request still {state} after {COMPLETION_TIMEOUT_S:.0f} s: {request}"
            )
            time.sleep(0.2)

        assert [d.processor for d in request.deliveries] == ["payroll-bureau"]
        delivered = api.enum("dsrelay.v1.DeliveryState", "DELIVERY_STATE_DELIVERED")
        assert request.deliveries[0].state == delivered
        # The subject is not in crm-db: that holder has nothing to erase there.
        assert sorted(t.subprocessor for t in request.tasks) == ["crm-db", "mail"], request.tasks


def _wait_completed(api: DynamicService, request_id: str):
    GetRequest = api.input("Get")
    completed = api.enum("dsrelay.v1.RequestState", "REQUEST_STATE_COMPLETED")
    deadline = time.monotonic() + COMPLETION_TIMEOUT_S
    while True:
        request = api.call("Get", GetRequest(request_id=request_id))
        if request.state == completed:
            return request
        state = api.enum_name("dsrelay.v1.RequestState", request.state)
        assert time.monotonic() < deadline, (
            f"request still {state} after {COMPLETION_TIMEOUT_S:.0f} s: {request}"
        )
        time.sleep(0.2)


def test_python_downloads_a_return_of_data_package(stack):
    with stack.registry("partner-crm") as ch:
        reflection = Reflection(ch)
        api = DynamicService(ch, reflection.pool_for_symbol(REQUEST_SERVICE), REQUEST_SERVICE)
        packages = DynamicService(
            ch, reflection.pool_for_symbol(PACKAGE_SERVICE), PACKAGE_SERVICE
        )
        SubjectIdentity = api.message("dsrelay.v1.SubjectIdentity")
        submitted = api.call(
            "Submit",
            api.input("Submit")(
                kind=api.enum("dsrelay.v1.RequestKind", "REQUEST_KIND_RETURN_OF_DATA"),
                identities=[
                    SubjectIdentity(
                        type=api.enum("dsrelay.v1.IdentityType", "IDENTITY_TYPE_EMAIL"),
                        encoding=api.enum("dsrelay.v1.IdentityEncoding", "IDENTITY_ENCODING_RAW"),
                        value=CUSTOMER_EMAIL,
                    )
                ],
                idempotency_key=f"interop-rod-{uuid.uuid4().hex}",
            ),
        )
        # COMPLETED only once every holder's part is stored at the registry.
        _wait_completed(api, submitted.request_id)

        info = packages.call(
            "GetPackage", packages.input("GetPackage")(request_id=submitted.request_id)
        )
        assert info.complete and not info.missing, info
        paths = [f.path for f in info.files]
        assert "payroll-bureau/crm-db/customers.csv" in paths, paths
        assert "payroll-bureau/crm-db/customers.json" in paths, paths

        messages = packages.stream(
            "DownloadPackage",
            packages.input("DownloadPackage")(request_id=submitted.request_id),
        )
        first = next(messages)
        assert first.WhichOneof("item") == "info", first
        manifest = json.loads(first.info.manifest_json)
        assert manifest["request_id"] == submitted.request_id
        expected = {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]}
        assert expected == {f.path: (f.size, f.sha256) for f in first.info.files}

        # Every file in manifest order, its chunks at consecutive offsets.
        received: dict[str, tuple[int, "hashlib._Hash"]] = {}
        contents: dict[str, bytes] = {}
        order: list[str] = []
        for message in messages:
            assert message.WhichOneof("item") == "file", message
            chunk = message.file
            assert 0 < len(chunk.data) <= 1024 * 1024
            if chunk.path not in received:
                order.append(chunk.path)
                received[chunk.path] = (0, hashlib.sha256())
                contents[chunk.path] = b""
            size, digest = received[chunk.path]
            assert chunk.offset == size, (chunk.path, chunk.offset, size)
            digest.update(chunk.data)
            received[chunk.path] = (size + len(chunk.data), digest)
            contents[chunk.path] += chunk.data
    # Empty files travel without chunks.
    for path, (size, _) in expected.items():
        if size == 0:
            received.setdefault(path, (0, hashlib.sha256()))
    assert order == [p for p in paths if expected[p][0] > 0]
    assert {p: (n, d.hexdigest()) for p, (n, d) in received.items()} == expected
    csv = contents["payroll-bureau/crm-db/customers.csv"].decode()
    assert CUSTOMER_NAME in csv and CUSTOMER_EMAIL in csv, csv


def test_invalid_submit_names_the_field(stack):
    with stack.registry("partner-crm") as ch:
        pool = Reflection(ch).pool_for_symbol(REQUEST_SERVICE)
        api = DynamicService(ch, pool, REQUEST_SERVICE)
        bad = _erasure_request(api, f"interop-bad-{uuid.uuid4().hex}", with_identity=False)
        with pytest.raises(grpc.RpcError) as err:
            api.call("Submit", bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "identities" in (err.value.details() or ""), err.value.details()


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_client(stack):
    """A CA unknown to the services and a client leaf from it carrying the operator's
    identity: only the chain is wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign operator")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(OPERATOR_OPS), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, leaf.public_bytes(serialization.Encoding.PEM)


def _refused(stack, port: int, credentials: grpc.ChannelCredentials) -> grpc.RpcError:
    with grpc.secure_channel(f"localhost:{port}", credentials) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _health(ch, "")
    return err.value


@pytest.mark.parametrize("side", ["registry", "processor"])
def test_refuses_client_without_certificate(stack, side):
    port = stack.registry_port if side == "registry" else stack.processor_port
    err = _refused(stack, port, stack.credentials(None))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())


@pytest.mark.parametrize("side", ["registry", "processor"])
def test_refuses_certificate_from_another_ca(stack, foreign_client, side):
    port = stack.registry_port if side == "registry" else stack.processor_port
    key_pem, cert_pem = foreign_client
    creds = grpc.ssl_channel_credentials(
        root_certificates=stack.read("ca.pem"), private_key=key_pem, certificate_chain=cert_pem
    )
    err = _refused(stack, port, creds)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())


def test_refuses_identity_without_role(stack):
    """partner-webform chains to the right CA but has no role in this registry."""
    with stack.registry("operator") as ch:
        pool = Reflection(ch).pool_for_symbol(REQUEST_SERVICE)
    with stack.registry("partner-webform") as ch:
        api = DynamicService(ch, pool, REQUEST_SERVICE)
        with pytest.raises(grpc.RpcError) as err:
            api.call("Submit", _erasure_request(api, f"interop-norole-{uuid.uuid4().hex}"))
    assert err.value.code() in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    ), (err.value.code(), err.value.details())
