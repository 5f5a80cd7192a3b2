"""Apache Kafka with SASL/SCRAM over TLS and ACLs, for the security tests (tests/test_security_kafka.py).

- ``make_tls``: a throwaway CA and a server certificate for 127.0.0.1/localhost, made with the
  ``openssl`` command (PEM files Kafka reads as they are: no keytool, no Python crypto package).
- ``secure_cluster``: a ``stream.kafka.KafkaCluster`` whose client (and inter-broker) listener is
  SASL_SSL with SCRAM-SHA-256, users created at format time, and the StandardAuthorizer with
  ``allow.everyone.if.no.acl.found=false``: a principal may do only what an ACL allows.
- ``create_acls``: ACLs through the Admin API (CreateAcls), as the admin user, waiting until the
  broker enforces them (aiokafka's admin client has no create_acls, the request itself it has).
- ``worker_acls``: the ACLs a `streamrec serve` worker needs, and nothing more (docs/stream.md, "Security").
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from stream.settings import Settings

MECHANISM = "SCRAM-SHA-256"
ADMIN = ("admin", "admin-secret")

# Kafka's ACL enums (org.apache.kafka.common.resource.ResourceType, acl.AclOperation, acl.AclPermissionType, PatternType)
TOPIC, GROUP, CLUSTER = 2, 3, 4
READ, WRITE, CREATE, DESCRIBE = 3, 4, 5, 8
ALLOW = 3
LITERAL = 3
RESOURCE_NAMES = {TOPIC: "Topic", GROUP: "Group", CLUSTER: "Cluster"}
OPERATION_NAMES = {READ: "Read", WRITE: "Write", CREATE: "Create", DESCRIBE: "Describe"}


@dataclass(frozen=True)
class Acl:
    """ALLOW ``operation`` on the literal resource ``name`` of ``resource`` to ``User:user`` from any host."""

    user: str
    resource: int
    name: str
    operation: int

    def __str__(self) -> str:
        return f"User:{self.user} {OPERATION_NAMES[self.operation]} {RESOURCE_NAMES[self.resource]}:{self.name}"


@dataclass(frozen=True)
class Tls:
    ca: Path  # the CA certificate: clients' --ssl-cafile, the brokers' truststore
    keystore: Path  # the server's PKCS#8 key and certificate chain, one PEM file


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_tls(directory: Path) -> Tls:
    """A CA and a server certificate signed by it for IP 127.0.0.1 and DNS localhost (valid one day, EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=streamrec-test-ca", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(extensions))
    keystore = directory / "server-keystore.pem"
    keystore.write_text(key.read_text() + cert.read_text() + ca.read_text())  # openssl 3 writes PKCS#8 ("BEGIN PRIVATE KEY")
    return Tls(ca=ca, keystore=keystore)


def secure_cluster(directory: Path, users: dict[str, str], **kwargs):
    """A one-node KafkaCluster (not started) on SASL_SSL/SCRAM-SHA-256 with ACLs; ``users``: name -> password
    besides the admin. The controller listener stays PLAINTEXT on loopback: the broker reaches its
    controller there as User:ANONYMOUS, which is why that principal is a super user as well (no
    client request reaches the broker listener unauthenticated)."""
    import ssl

    from stream.kafka import KafkaCluster

    tls = make_tls(directory / "tls")
    admin, password = ADMIN
    jaas = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{admin}" password="{password}";'
    config = {
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{admin};User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
    }
    scram = [("--add-scram", f"{MECHANISM}=[name={name},password={secret}]") for name, secret in {admin: password, **users}.items()]
    client = dict(security_protocol="SASL_SSL", sasl_mechanism=MECHANISM, sasl_plain_username=admin, sasl_plain_password=password, ssl_context=ssl.create_default_context(cafile=str(tls.ca)))
    cluster = KafkaCluster(data_dir=directory / "kafka", config=config, listener="SASL_SSL", format_args=tuple(a for pair in scram for a in pair), client=client, **kwargs)
    cluster.tls = tls
    return cluster


def client_settings(cluster, user: str, password: str, **changes) -> Settings:
    """Settings of a client of ``cluster`` that authenticates as ``user`` over SASL_SSL."""
    base = dict(broker=cluster.url, security_protocol="SASL_SSL", sasl_mechanism=MECHANISM, sasl_username=user, sasl_password=password, ssl_cafile=str(cluster.tls.ca))
    base.update(changes)
    return Settings(**base)


def worker_acls(settings: Settings, user: str) -> list[Acl]:
    """Every right a worker with these settings uses, for ``user``, all on literal names:

    - Read on the clicks and model-updates topics; Write on recommendations and the dead-letter topic;
    - Read and Write on its session table's changelog ``<app_id>-sessions-changelog`` (written as it
      serves, read back when it takes a partition over);
    - Read on Faust's leader topic ``<app_id>-__assignor-__leader``, which Faust subscribes to;
    - Create on those two topics of Faust's own, and on no other: they exist already (an admin made
      every topic first, ``worker_topics``), but Faust asks the broker to create them at every start
      (its client's metadata does not list them yet) and takes the answer "exists" as success; to a
      principal without Create the broker answers "not authorized" instead, and the worker stops;
    - Read on the consumer group ``<app_id>``.

    Read and Write imply Describe. The worker creates the other four topics only when they are
    missing (stream.topics.ensure_topics), so it needs no Create on them when an admin made them.
    """
    app = settings.app_id
    rights = [
        (TOPIC, settings.clicks_topic, READ),
        (TOPIC, settings.model_updates_topic, READ),
        (TOPIC, settings.recommendations_topic, WRITE),
        (TOPIC, settings.dlq_topic, WRITE),
        (TOPIC, f"{app}-sessions-changelog", READ),
        (TOPIC, f"{app}-sessions-changelog", WRITE),
        (TOPIC, f"{app}-sessions-changelog", CREATE),
        (TOPIC, f"{app}-__assignor-__leader", READ),
        (TOPIC, f"{app}-__assignor-__leader", CREATE),
        (GROUP, app, READ),
    ]
    return [Acl(user, resource, name, operation) for resource, name, operation in rights]


def worker_topics(settings: Settings) -> list:
    """NewTopic of every topic a worker reads or writes, as the worker itself would create it
    (stream.topics.ensure_topics, Faust's changelog and leader topic), for an admin to create first."""
    from aiokafka.admin import NewTopic

    from stream.topics import MODEL_UPDATES_CONFIG

    p, rf = settings.partitions, settings.replication_factor
    return [
        NewTopic(settings.clicks_topic, p, rf),
        NewTopic(settings.recommendations_topic, p, rf),
        NewTopic(settings.dlq_topic, p, rf),
        NewTopic(settings.model_updates_topic, 1, rf, topic_configs=MODEL_UPDATES_CONFIG),
        NewTopic(f"{settings.app_id}-sessions-changelog", p, rf, topic_configs={"cleanup.policy": "compact"}),
        NewTopic(f"{settings.app_id}-__assignor-__leader", 1, rf),
    ]


async def _admin(settings: Settings):
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.kafka_kwargs(), request_timeout_ms=30000)
    await admin.start()
    return admin


def create_topics(admin_settings: Settings, topics: list) -> None:
    """Create ``topics`` as the admin and wait until each has a leader; an error for any that fails."""
    from stream.topics import topic_partitions

    async def run():
        admin = await _admin(admin_settings)
        try:
            response = await admin.create_topics(topics)
        finally:
            await admin.close()
        failed = [(t[0], t[1]) for t in response.topic_errors if t[1] != 0]
        assert not failed, f"creating topics failed: {failed}"
        known = await topic_partitions(admin_settings, [t.name for t in topics], timeout=30)
        assert all(known.values()), f"topics without a leader: {known}"

    asyncio.run(run())


def _create_acls_request(acls: list[Acl]):
    from aiokafka.protocol.admin import CreateAclsRequest_v1
    from aiokafka.protocol.api import Request

    class CreateAcls(Request[CreateAclsRequest_v1]):
        API_KEY = 30

        def build(self, request_struct_class):
            return request_struct_class([(a.resource, a.name, LITERAL, f"User:{a.user}", "*", a.operation, ALLOW) for a in acls])

    return CreateAcls()


def _describe_acls_request():
    """DescribeAcls v1 for every ACL (aiokafka's v2 struct lacks the flexible encoding v2 wants)."""
    from aiokafka.protocol.admin import DescribeAclsRequest_v1
    from aiokafka.protocol.api import Request

    ANY = 1  # ResourceType.ANY, PatternType.ANY, AclOperation.ANY, AclPermissionType.ANY

    class DescribeAcls(Request[DescribeAclsRequest_v1]):
        API_KEY = 29

        def build(self, request_struct_class):
            return request_struct_class(ANY, None, ANY, None, None, ANY, ANY)

    return DescribeAcls()


def create_acls(admin_settings: Settings, acls: list[Acl], timeout: float = 30.0) -> None:
    """Create ``acls`` (CreateAcls, as the admin) and wait until the broker lists every one of them."""

    async def run():
        admin = await _admin(admin_settings)
        try:
            response = await admin._send_request(_create_acls_request(acls))
            errors = [(str(a), code, message) for a, (code, message) in zip(acls, response.creation_responses) if code]
            assert not errors, f"CreateAcls failed: {errors}"
            wanted = {(a.resource, a.name, f"User:{a.user}", a.operation) for a in acls}
            deadline = time.monotonic() + timeout
            while True:
                described = await admin._send_request(_describe_acls_request())
                assert described.error_code == 0, f"DescribeAcls failed: {described.error_message}"
                seen = {(r[0], r[1], acl[0], acl[2]) for r in described.resources for acl in r[3]}  # (type, name, pattern, acls)
                if wanted <= seen:
                    return
                assert time.monotonic() < deadline, f"the broker does not list the new ACLs within {timeout:.0f}s: {sorted(wanted - seen)}"
                await asyncio.sleep(0.2)
        finally:
            await admin.close()

    asyncio.run(run())
