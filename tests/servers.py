"""Real servers for the tests: a private redis-server and SeaweedFS's S3 gateway, on
loopback ports of their own, plus Celery workers as processes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import boto3
import redis
from botocore.config import Config

from producer.local_fleet import redis_server_binary, worker_command

S3_KEY, S3_SECRET = "fleet-test-key", "fleet-test-secret"


@dataclass(frozen=True)
class TlsFiles:
    """A private CA, a certificate for 127.0.0.1 and localhost signed by it (the
    servers'), and a client certificate (for mutual TLS), made by ``openssl``."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, folder: Path) -> TlsFiles:
        folder.mkdir(parents=True, exist_ok=True)
        files = cls(
            *(
                folder / n
                for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
            )
        )
        ca_key = folder / "ca.key"

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
                "-out", str(files.ca), "-days", "2", "-subj", "/CN=test CA")  # fmt: skip
        (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        for name, cert, key, ext in (
            ("localhost", files.server_cert, files.server_key, ["-extfile", "server.ext"]),
            ("embed-fleet worker", files.client_cert, files.client_key, []),
        ):
            request = folder / f"{key.stem}.csr"
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(request), "-subj", f"/CN={name}")  # fmt: skip
            openssl("x509", "-req", "-in", str(request), "-CA", str(files.ca),
                    "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
                    "-days", "2", *ext)  # fmt: skip
        return files


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_grpc_twin: bool = False) -> int:
    """A free port; SeaweedFS also binds port + 10000 for gRPC, so check both."""
    for _ in range(200):
        port = random.randint(20000, 29999) if with_grpc_twin else random.randint(30000, 60000)
        if _port_free(port) and (not with_grpc_twin or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port")


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class RedisServer:
    """A private redis-server that a test may kill and restart (same port)."""

    def __init__(
        self,
        workdir: Path,
        tls: TlsFiles | None = None,
        password: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """With ``tls``: TLS only (the plain port closed), clients must show a certificate
        of the CA, and :attr:`url` is a ``rediss://`` URL that carries the CA and the
        client's certificate; with ``password``, Redis wants it (in the URL)."""
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.extra = extra
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        if tls:
            self.url = (
                f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                f"&ssl_ca_certs={tls.ca}&ssl_certfile={tls.client_cert}"
                f"&ssl_keyfile={tls.client_key}"
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        listen = ["--port", str(self.port)]
        if self.tls:
            listen = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes",
            ]  # fmt: skip
        if self.password:
            listen += ["--requirepass", self.password]
        listen += self.extra
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                *listen,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(client.ping, 10, "redis-server")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class SentinelRedis:
    """A Redis primary, ``replicas`` replicas and three Sentinels that watch them (quorum
    2), each a process on a loopback port of its own, as a team runs Redis for a fleet;
    quick to fail over (a primary is down after 1 s without an answer). :attr:`url` is
    the fleet's ``sentinel://`` URL. Each Sentinel logs to ``sentinel-N.log`` in
    ``workdir`` (what a failed wait is read against)."""

    MASTER = "fleet"

    def __init__(self, workdir: Path, replicas: int = 1) -> None:
        """With two or more replicas a test can fail over again without waiting for the
        killed primary to come back: the Sentinels point the other replicas at the one
        they promote, as part of the failover itself.

        Only the first replica may be promoted at first; the others are standbys
        (``replica-priority 0``), each made a candidate once the failover before it is
        done (:meth:`fail_over`). One candidate per failover: a Sentinel that lost the
        vote for a failover, and has not yet heard who won, starts its own once its
        failover timeout has passed; with two candidates it could promote the other one
        and drop the winner's writes since."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.primary = RedisServer(workdir / "a")
        follow = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replicas = [
            RedisServer(
                workdir / f"r{i}", extra=follow if i == 0 else (*follow, "--replica-priority", "0")
            )
            for i in range(replicas)
        ]
        self.replica = self.replicas[0]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        parts = [f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports]
        self.url = ";".join(parts) + f"/0?master={self.MASTER}"

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    def start(self) -> None:
        for server in self.servers:
            server.workdir.mkdir(exist_ok=True)
            server.start()
        for i, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"logfile {self.workdir / f'sentinel-{i}.log'}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 4000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_for(lambda: self.master_port() == self.primary.port, 20, "Sentinels")
        for replica in self.replicas:
            wait_for(partial(_follows, replica, self.primary), 20, "a replica")
            wait_for(partial(self._replica_known, replica.port), 20, "the Sentinels' replicas")

    def _agreed(self, new: RedisServer) -> Callable[[], bool]:
        def check() -> bool:
            for port in self.sentinel_ports:
                found = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(
                    self.MASTER
                )
                if not found or int(found[1]) != new.port:
                    return False
            role = redis.Redis(port=new.port, socket_timeout=1).info("replication")["role"]
            return bool(role == "master")

        return check

    def _replica_known(self, replica_port: int, priority: int | None = None) -> bool:
        """Whether every Sentinel sees a replica on that port, up (and with that
        ``priority``, where one is given)."""
        for port in self.sentinel_ports:
            replicas = redis.Redis(port=port, socket_timeout=1).sentinel_slaves(self.MASTER)
            if not any(
                int(r["port"]) == replica_port
                and "s_down" not in str(r["flags"])
                and (priority is None or int(r["slave-priority"]) == priority)
                for r in replicas
            ):
                return False
        return True

    def master_port(self) -> int | None:
        """The primary's port as a Sentinel that answers says it is."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                found = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(
                    self.MASTER
                )
                if found:
                    return int(found[1])
        return None

    def server(self, port: int) -> RedisServer:
        (found,) = [server for server in self.servers if server.port == port]
        return found

    def fail_over(self, timeout: float = 60, rejoin: bool = True) -> RedisServer:
        """Kill -9 the current primary and wait until every Sentinel names another one
        and it says so itself. The replicas still alive follow it before this returns,
        known to every Sentinel, so a further failover has a replica to promote. With
        ``rejoin`` (and no such replica left) the dead one is started again as the new
        primary's replica first. Returns the new primary."""
        old = self.server(self.master_port() or self.primary.port)
        assert old.proc is not None
        old.proc.kill()
        old.proc.wait()
        old.proc = None
        wait_for(lambda: self.master_port() not in (None, old.port), timeout, "a failover")
        new = self.server(self.master_port() or 0)
        # Every Sentinel agrees and the new primary says so itself (on a loaded machine
        # they can lag each other by seconds).
        wait_for(self._agreed(new), timeout, "the Sentinels to agree on the new primary")
        alive = [s for s in self.servers if s.proc is not None and s is not new]
        if not alive and rejoin:
            # Back as the new primary's replica, as a deployment starts a Redis after
            # asking the Sentinels who the primary is; they find it through the primary.
            old.extra = ("--replicaof", "127.0.0.1", str(new.port))
            old.start()
            alive = [old]
        for replica in alive:
            wait_for(partial(_follows, replica, new), timeout, "a replica of the new primary")
            wait_for(partial(self._replica_known, replica.port), timeout, "known replicas")
        if alive and not any(self._priority(s) for s in alive):
            standby = alive[0]
            redis.Redis(port=standby.port).config_set("replica-priority", 100)
            # The Sentinels read a replica's priority from its INFO, every 10 s. On a
            # loaded machine a Sentinel can meanwhile find the new primary silent past
            # down-after-milliseconds and fail over once more, to this candidate (seen
            # in a CI run: a second failover 1 s after the first). Then the candidate
            # is the primary, its predecessor a replica at the default priority: as
            # good for the next failover, so the wait accepts either.
            wait_for(
                lambda: (
                    self._replica_known(standby.port, 100) or self.master_port() == standby.port
                ),
                timeout,
                "a candidate",
            )
        return self.server(self.master_port() or new.port)

    @staticmethod
    def _priority(server: RedisServer) -> int:
        found = redis.Redis(port=server.port).config_get("replica-priority")
        return int(found["replica-priority"])

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        for server in self.servers:
            server.stop()


def _follows(replica: RedisServer, primary: RedisServer) -> bool:
    info = redis.Redis(port=replica.port, socket_timeout=1).info("replication")
    return bool(
        info.get("role") == "slave"
        and info.get("master_port") == primary.port
        and info.get("master_link_status") == "up"
    )


class SeaweedS3:
    """``weed mini``: master, volume, filer and S3 gateway in one process, loopback only,
    with credentials enforced (they are in its environment)."""

    def __init__(self, workdir: Path, tls: TlsFiles | None = None) -> None:
        """With ``tls``: the S3 gateway also serves HTTPS with the CA's certificate, and
        :attr:`endpoint` is that one (:attr:`env` names the CA bundle)."""
        self.workdir = workdir
        self.port = free_port(with_grpc_twin=True)
        self.tls = tls
        self.https_port = free_port(with_grpc_twin=True) if tls else 0
        self.endpoint = (
            f"https://127.0.0.1:{self.https_port}" if tls else f"http://127.0.0.1:{self.port}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        ports = {
            name: free_port(with_grpc_twin=True) for name in ("master", "volume", "filer", "admin")
        }
        args = [
            weed,
            "mini",
            f"-dir={self.workdir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port.iceberg={free_port()}",
            f"-s3.port.lance={free_port()}",
        ]
        if self.tls:
            args += [
                f"-s3.port.https={self.https_port}",
                f"-s3.cert.file={self.tls.server_cert}",
                f"-s3.key.file={self.tls.server_key}",
            ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        self.log = (self.workdir / "weed.log").open("wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        client = self.client()
        wait_for(lambda: client.list_buckets() is not None, 60, "SeaweedFS S3")

    def client(self) -> object:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
            verify=str(self.tls.ca) if self.tls else None,
            config=Config(
                s3={"addressing_style": "path"}, connect_timeout=2, retries={"max_attempts": 1}
            ),
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            **({"AWS_CA_BUNDLE": str(self.tls.ca)} if self.tls else {}),
        }

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        # weed leaves its unix sockets in /tmp, named by port.
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            with contextlib.suppress(OSError):
                if not _socket_alive(sock):
                    sock.unlink()


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class Worker:
    """``celery -A workers.app worker -Q <queue>`` as a process group of its own, so a
    test can kill -9 it (parent and prefork child) like a crashed container."""

    def __init__(
        self, queue: str, env: dict[str, str], log: Path, hostname: str | None = None
    ) -> None:
        self.queue = queue
        self.log_path = log
        self.log = log.open("ab")
        self.name = f"{queue.replace(',', '+')}-{random.randint(0, 1 << 30)}"
        command = worker_command(queue, f"{self.name}@%h", "INFO")
        if hostname:
            # A hostname of its own, as a container has (a UTS namespace; root only).
            launch = f'hostname {hostname} && exec "$@"'
            command = ["unshare", "--uts", "sh", "-c", launch, "sh", *command]
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait_ready(self, timeout: float = 120) -> None:
        """Until Celery logs the worker ready (its pool's children started)."""
        wait_for(lambda: b" ready." in self.log_path.read_bytes(), timeout, f"worker {self.name}")

    def memory(self) -> dict[int, tuple[int, int]]:
        """Each process of the worker (the parent and its pool's children): its resident
        memory now and its peak (``VmRSS``, ``VmHWM``), in bytes."""
        found: dict[int, tuple[int, int]] = {}
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(status.parent.name)
                if os.getpgid(pid) != self.proc.pid:
                    continue
                fields = dict(
                    line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
                )
                found[pid] = (
                    int(fields["VmRSS"].split()[0]) * 1024,
                    int(fields["VmHWM"].split()[0]) * 1024,
                )
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
