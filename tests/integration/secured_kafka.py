"""A secured single-node Kafka broker for ``test_security.py``: a throwaway CA, TLS and SASL listeners, SCRAM users
and the ACLs of ``docs/SECURITY.md``.

Listeners of :func:`start_secured_broker`, all on 127.0.0.1::

    PLAINTEXT   readiness probe of detector/broker.py only: User:ANONYMOUS, which no ACL names, so it may
                read and write nothing
    SASL_SSL    SCRAM-SHA-512 over TLS (server certificate only): User:<SCRAM user name>
    SSL         mutual TLS, ssl.client.auth=required: User:<CN of the client certificate>
    CONTROLLER  mutual TLS; the broker talks to its own controller as User:broker, the only super user

Every certificate is an EC P-256 key signed by one CA made for the run (``openssl``, PEM files the Python
clients read as they are; the broker reads PEM too: ``ssl.keystore.type=PEM``). Certificates carry
``IP:127.0.0.1`` as subject alternative name, so clients verify the broker's host name.

:data:`ACLS` is the one table of permissions. :func:`acl_commands` renders it as the ``kafka-acls.sh`` commands
printed in docs/SECURITY.md (``test_security.py`` checks the document quotes them exactly), and
:func:`run_acl_commands` runs those very commands against the broker.
"""

from __future__ import annotations

import secrets
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detector import broker
from detector.settings import KafkaSettings, Secret, Settings

CA_NAME = "distill-detector-test-ca"
#: Client identities: a SCRAM user and a client certificate (CN) each.
USERS = ("detector", "gateway", "ratelimiter")
SUPER_USER = "broker"
SCRAM_MECHANISM = "SCRAM-SHA-512"
#: Maps a certificate's subject ``CN=<name>`` to the principal ``User:<name>``.
PRINCIPAL_MAPPING = "RULE:^CN=([^,]+)$/$1/,DEFAULT"
#: Topics and consumer group of the default settings (docs/SECURITY.md uses the same names).
TOPICS = Settings().topics
GROUP = Settings().worker.app_id


@dataclass(frozen=True)
class Acl:
    """Allow ``principal`` the ``operations`` on one resource (``pattern`` ``literal`` or ``prefixed``)."""

    principal: str
    resource: str  # topic | group
    name: str
    operations: tuple[str, ...]
    pattern: str = "literal"


#: Who may do what, least privilege. The detector's own topics (Faust's ``<app id>-...`` internal topics) are a
#: prefix; every other topic is named. No principal gets cluster-wide rights; User:ANONYMOUS gets nothing.
ACLS: tuple[Acl, ...] = (
    Acl("User:detector", "topic", TOPICS.api_calls, ("Read", "Describe")),
    Acl("User:detector", "topic", TOPICS.analyst_labels, ("Read", "Describe")),
    Acl("User:detector", "topic", TOPICS.risk_scores, ("Write", "Describe", "DescribeConfigs")),
    Acl("User:detector", "topic", TOPICS.dead_letters, ("Write", "Describe")),
    Acl("User:detector", "topic", TOPICS.blocked_keys, ("Write", "Describe")),
    Acl("User:detector", "topic", TOPICS.cluster_signals, ("Read", "Write", "Describe")),
    Acl("User:detector", "group", GROUP, ("Read",)),
    Acl("User:detector", "topic", f"{GROUP}-", ("Create", "Read", "Write", "Describe"), pattern="prefixed"),
    Acl("User:gateway", "topic", TOPICS.api_calls, ("Write", "Describe")),
    Acl("User:ratelimiter", "topic", TOPICS.risk_scores, ("Read", "Describe")),
    Acl("User:ratelimiter", "topic", TOPICS.blocked_keys, ("Read", "Describe")),
)


def acl_commands(acls: Sequence[Acl] = ACLS, bootstrap: str = "kafka:9093",
                 command_config: str = "admin.properties") -> list[str]:
    """The ``kafka-acls.sh`` command of each entry of ``acls``, as docs/SECURITY.md prints them.

    >>> print(acl_commands([Acl("User:gateway", "topic", "api-calls", ("Write", "Describe"))])[0])
    kafka-acls.sh --bootstrap-server kafka:9093 --command-config admin.properties --add \\
      --allow-principal User:gateway --operation Write --operation Describe --topic api-calls
    """
    commands = []
    for acl in acls:
        operations = " ".join(f"--operation {op}" for op in acl.operations)
        pattern = " --resource-pattern-type prefixed" if acl.pattern == "prefixed" else ""
        commands.append(f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config {command_config} --add \\\n"
                        f"  --allow-principal {acl.principal} {operations} --{acl.resource} {acl.name}{pattern}")
    return commands


def run_acl_commands(sb: SecuredBroker, commands: Sequence[str], timeout_s: float = 90.0) -> str:
    """Run ``kafka-acls.sh`` command lines (as :func:`acl_commands` renders them) against ``sb`` as its super user
    and return their output.

    The jars have no ``kafka-acls.sh``, which only runs ``kafka.admin.AclCommand``: each line's arguments go to
    that class, all in one JVM (a JVM per command would cost about 2 s each). The ``--bootstrap-server`` and
    ``--command-config`` of each line are replaced by the broker's mTLS listener and an ``admin.properties`` for
    User:broker. Raises RuntimeError with the output's tail when a command fails (AclCommand then exits 1).
    """
    work = sb.handle.data_dir.parent / "acls"
    work.mkdir(exist_ok=True)
    config = work / "admin.properties"
    config.write_text(admin_properties(sb.pki))
    lines = []
    for command in commands:
        program, *argv = shlex.split(command.replace("\\\n", " "))
        assert program == "kafka-acls.sh", command
        for option, value in (("--bootstrap-server", sb.mtls), ("--command-config", str(config))):
            argv[argv.index(option) + 1] = value
        lines.append("\t".join(argv))
    (work / "commands.tsv").write_text("\n".join(lines) + "\n")
    (work / "RunAclCommands.java").write_text(_ACL_RUNNER)
    libs = broker.ensure_jars()
    log4j = (sb.handle.data_dir / "log4j.properties").as_uri()
    java = [broker._java(), "-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", f"{libs}/*",
            f"-Dlog4j.configuration={log4j}"]  # a short-lived tool: no JIT tiers, no parallel GC
    result = subprocess.run([*java, str(work / "RunAclCommands.java"), str(work / "commands.tsv")],
                            capture_output=True, text=True, timeout=timeout_s, check=False)
    output = result.stdout + result.stderr
    (work / "output.txt").write_text(output)
    if result.returncode != 0:
        raise RuntimeError(f"kafka-acls commands failed (exit {result.returncode}): {output[-2000:]}")
    return output


_ACL_RUNNER = """\
// Written by tests/integration/secured_kafka.py: runs kafka-acls.sh's class, kafka.admin.AclCommand, once per
// line of a file of tab-separated arguments, in one JVM. AclCommand exits the JVM with 1 when a command fails.
import java.nio.file.Files;
import java.nio.file.Path;

public class RunAclCommands {
    public static void main(String[] args) throws Exception {
        for (String line : Files.readAllLines(Path.of(args[0]))) {
            if (!line.isBlank()) {
                kafka.admin.AclCommand.main(line.split("\\t"));
            }
        }
    }
}
"""


def admin_properties(pki: Pki) -> str:
    """The ``--command-config`` file of ``kafka-acls.sh`` for the super user: mutual TLS with PEM files.

    >>> print(admin_properties(Pki(Path("/tls"))), end="")
    security.protocol=SSL
    ssl.truststore.type=PEM
    ssl.truststore.location=/tls/ca.pem
    ssl.keystore.type=PEM
    ssl.keystore.location=/tls/broker.chain.pem
    """
    return (f"security.protocol=SSL\nssl.truststore.type=PEM\nssl.truststore.location={pki.ca}\n"
            f"ssl.keystore.type=PEM\nssl.keystore.location={pki.chain(SUPER_USER)}\n")


# ------------------------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    """PEM files of one run: ``ca.pem``, and for each identity ``<name>.pem`` (certificate) and ``<name>.key``
    (unencrypted PKCS#8 key); ``<name>.chain.pem`` is the key followed by the certificate (the broker's PEM
    keystore). ``outsider`` is signed by another CA that the broker does not trust."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def chain(self, name: str) -> Path:
        return self.directory / f"{name}.chain.pem"


def make_pki(directory: Path, names: Sequence[str] = (SUPER_USER, *USERS)) -> Pki:
    """A CA and one certificate per name (``CN=<name>``, SAN ``IP:127.0.0.1, DNS:localhost``), plus ``outsider``
    from a second CA. About 0.2 s with openssl 3."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    _ca(directory / "ca", CA_NAME)
    _ca(directory / "other-ca", "untrusted-ca")
    for name in names:
        _leaf(directory, name, directory / "ca")
    _leaf(directory, "outsider", directory / "other-ca")
    return pki


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip().splitlines()[-1:]}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def _ca(stem: Path, cn: str) -> None:
    _key(stem.with_suffix(".key"))
    _openssl("req", "-x509", "-new", "-key", str(stem.with_suffix(".key")), "-sha256", "-days", "2",
             "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(stem.with_suffix(".pem")))


def _leaf(directory: Path, name: str, ca: Path) -> None:
    key, csr, cert, ext = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext"))
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=critical,CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.with_suffix(".pem")), "-CAkey", str(ca.with_suffix(".key")),
             "-set_serial", str(secrets.randbits(63)), "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert))
    (directory / f"{name}.chain.pem").write_text(key.read_text() + cert.read_text())


# ------------------------------------------------------------------------------------------------ broker


@dataclass(frozen=True)
class SecuredBroker:
    """A running secured broker: where each listener is, the CA and certificates, and the SCRAM passwords."""

    handle: broker.BrokerHandle
    pki: Pki
    passwords: dict[str, str]

    @property
    def sasl_ssl(self) -> str:
        return self.handle.listeners["SASL_SSL"]

    @property
    def mtls(self) -> str:
        return self.handle.listeners["SSL"]

    def scram(self, user: str, password: str | None = None) -> KafkaSettings:
        """Settings of ``user`` over SASL_SSL (its own password unless ``password`` is given)."""
        return KafkaSettings(bootstrap=self.sasl_ssl, security_protocol="SASL_SSL", sasl_mechanism=SCRAM_MECHANISM,
                             sasl_username=user, sasl_password=Secret(self.passwords[user] if password is None
                                                                      else password),
                             ssl_cafile=str(self.pki.ca))

    def cert(self, name: str | None) -> KafkaSettings:
        """Settings of the holder of certificate ``name`` over mutual TLS (no client certificate for None)."""
        if name is None:
            return KafkaSettings(bootstrap=self.mtls, security_protocol="SSL", ssl_cafile=str(self.pki.ca))
        return KafkaSettings(bootstrap=self.mtls, security_protocol="SSL", ssl_cafile=str(self.pki.ca),
                             ssl_certfile=str(self.pki.cert(name)), ssl_keyfile=str(self.pki.key(name)))

    def env(self, kafka: KafkaSettings) -> dict[str, str]:
        """``kafka`` as the ``DETECTOR_KAFKA__*`` variables a ``detector`` process reads."""
        return {"DETECTOR_KAFKA__BOOTSTRAP": kafka.bootstrap,
                "DETECTOR_KAFKA__SECURITY_PROTOCOL": kafka.security_protocol,
                "DETECTOR_KAFKA__SASL_MECHANISM": kafka.sasl_mechanism,
                "DETECTOR_KAFKA__SASL_USERNAME": kafka.sasl_username,
                "DETECTOR_KAFKA__SASL_PASSWORD": kafka.sasl_password.reveal(),
                "DETECTOR_KAFKA__SSL_CAFILE": kafka.ssl_cafile,
                "DETECTOR_KAFKA__SSL_CERTFILE": kafka.ssl_certfile,
                "DETECTOR_KAFKA__SSL_KEYFILE": kafka.ssl_keyfile}


def broker_properties(pki: Pki) -> dict[str, str]:
    """The security part of ``server.properties``: TLS from PEM files, SCRAM on SASL_SSL, client certificates
    required on SSL and CONTROLLER, the KRaft authorizer with User:broker as the only super user."""
    return {
        "inter.broker.listener.name": "SSL",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(pki.chain(SUPER_USER)),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(pki.ca),
        "ssl.principal.mapping.rules": PRINCIPAL_MAPPING,
        "listener.name.ssl.ssl.client.auth": "required",
        "listener.name.controller.ssl.client.auth": "required",
        "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
        f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{SUPER_USER}",
        "allow.everyone.if.no.acl.found": "false",
    }


def start_secured_broker(directory: Path, wait_s: float = 60.0) -> SecuredBroker:
    """Make the PKI, start the broker with SCRAM users :data:`USERS` (random passwords) and return it. The ACLs
    are not created here (see :func:`run_acl_commands`)."""
    pki = make_pki(directory / "pki")
    passwords = {user: secrets.token_hex(16) for user in USERS}
    data_dir = directory / "broker"
    port, sasl_ssl, mtls = _distinct_free_ports(3)
    handle = broker.start(
        data_dir, port=port, wait_s=wait_s,
        listeners=[broker.Listener("SASL_SSL", sasl_ssl), broker.Listener("SSL", mtls)],
        controller_protocol="SSL", properties=broker_properties(pki),
        add_scram=[f"{SCRAM_MECHANISM}=[name={user},password={password}]" for user, password in passwords.items()],
    )
    return SecuredBroker(handle, pki, passwords)


def _distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := broker.free_port()) not in ports:
            ports.append(port)
    return ports
