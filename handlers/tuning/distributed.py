"""A tuning job over N training processes: the recipe in N ranks under torch.distributed, rank 0 bridged to
the stage.

`train(devices, ...)` has `recipe.train`'s contract and runs on the stage's training thread. It prepares the
data once here (the dataset lint runs in the worker, as for one process), then starts N child processes
(`python -m handlers.tuning.distributed SPEC`, with torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE) that rendezvous through a file in the job's folder (no port to pick) on gloo (CPU) or
NCCL (CUDA, one GPU per rank). Every rank runs the same `recipe.train` (see its docstring for the sharding);
rank 0 alone talks to this process over a private socket pair: step reports become `hooks.on_step`, a
checkpoint waits for `hooks.on_checkpoint` (the upload) and a "durable" reply, and `hooks.should_stop`
(cancellation, a failed upload) is sent down as "stop", which the ranks agree on at the next step.

Kill safety: the ranks form one process group, killed as a group when the attempt ends however it ends;
each rank asks Linux for SIGKILL when the worker dies (`PR_SET_PDEATHSIG`), so kill -9 of the worker leaves
no rank behind. A rank killed (kill -9, the OOM killer) ends the attempt with `RanksLost`: the stage retries
the job, which resumes from its last durable checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import CodeTuneError
from events.payloads import Hyperparameters

if TYPE_CHECKING:
    from handlers.tuning.recipe import StepInfo, TrainHooks, TrainResult

log = logging.getLogger("codetune.tuning.distributed")

FD_ENV = "CODETUNE_RANK_FD"  # rank 0's end of the socket pair to the worker
PARENT_ENV = "CODETUNE_RANK_PARENT"  # the worker's pid: a rank started after it died exits at once
PR_SET_PDEATHSIG = 1
POLL_S = 0.2
GRACE_S = 5.0  # after rank 0 fails: how long the other ranks may take to notice and exit
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a checkpoint upload holds the other ranks in their next collective


class RanksLost(Exception):
    """A rank died (killed by a signal, or exited without a word): the attempt is over and retryable."""


@dataclass
class Spec:
    """What every rank needs: the recipe's arguments, with the data already prepared by the worker."""

    base_dir: Path
    dataset_path: Path
    fmt: str
    hp: Hyperparameters
    out_dir: Path
    resume_dir: Path | None
    base: tuple[str, str] | None
    train: list[Any]
    val: list[Any]
    store_file: Path


def devices_for(hp: Hyperparameters, max_devices: int) -> int:
    """The training processes a job gets: what it asked, capped by the worker (and the GPUs it sees)."""
    n = min(hp.devices, max_devices)
    if n > 1:
        import torch

        if torch.cuda.is_available():
            n = min(n, torch.cuda.device_count())
    return max(1, n)


# --------------------------------------------------------------------------- the worker's side


def train(devices: int, base_dir: Path, dataset_path: Path, fmt: str, hp: Hyperparameters, out_dir: Path,
          hooks: TrainHooks, resume_dir: Path | None = None, prepare: Any = None,
          base: tuple[str, str] | None = None) -> TrainResult:
    """`recipe.train` over `devices` ranks (see the module docstring); blocks until they are done."""
    from transformers import AutoTokenizer

    from handlers.tuning import data as D

    out_dir = Path(out_dir)
    ranks_dir = out_dir / "ranks"
    ranks_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_set, val = (prepare or D.prepare)(tokenizer, Path(dataset_path), fmt, hp.max_seq_len,
                                            hp.validation_split, hp.seed, hp.packing)
    attempt = uuid.uuid4().hex[:8]
    spec = Spec(Path(base_dir), Path(dataset_path), fmt, hp, out_dir, resume_dir, base, train_set, val,
                store_file=ranks_dir / f"rendezvous-{attempt}")
    spec_path = ranks_dir / f"spec-{attempt}.pkl"
    spec_path.write_bytes(pickle.dumps(spec))
    ours, theirs = socket.socketpair()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = _start(devices, spec_path, theirs)
        theirs.close()
        conn = Connection(ours.detach())
        try:
            return _bridge(conn, procs, hooks)
        finally:
            conn.close()
    finally:
        ours.close()
        _end(procs)
        spec_path.unlink(missing_ok=True)
        spec.store_file.unlink(missing_ok=True)


def _start(n: int, spec_path: Path, rank0_end: socket.socket) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not _secret(k)}  # the ranks talk to no store
    env |= {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), PARENT_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(_root()), os.environ.get("PYTHONPATH")) if p)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local ranks: gloo's pairs on loopback, not the host's NIC
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(n):
        rank_env = env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        fds: tuple[int, ...] = ()
        if rank == 0:
            rank_env[FD_ENV] = str(rank0_end.fileno())
            fds = (rank0_end.fileno(),)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "handlers.tuning.distributed", str(spec_path)], env=rank_env, pass_fds=fds,
            process_group=procs[0].pid if procs else 0, stdin=subprocess.DEVNULL))
    log.info("started %d training ranks (pids %s)", n, [p.pid for p in procs])
    return procs


def _secret(name: str) -> bool:
    """Credentials in the worker's environment (CODETUNE_*_PASSWORD, CODETUNE_S3_SECRET_KEY, HF_TOKEN, ...)."""
    return name.upper().endswith(("PASSWORD", "SECRET", "TOKEN", "SECRET_KEY", "ACCESS_KEY"))


def _root() -> Path:
    return Path(__file__).resolve().parents[2]


def _bridge(conn: Connection, procs: list[subprocess.Popen[bytes]], hooks: TrainHooks) -> TrainResult:
    """Serve rank 0's reports until it sends its result; watch every rank meanwhile."""
    stop_sent = False
    while True:
        if not stop_sent and hooks.should_stop():
            conn.send(("stop",))
            stop_sent = True
        if conn.poll(POLL_S):
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                _lost(procs, "rank 0 closed its connection")
            kind = msg[0] if isinstance(msg, tuple) and msg else None
            if kind == "step":
                hooks.on_step(msg[1])
            elif kind == "checkpoint":
                hooks.on_checkpoint(Path(msg[1]), int(msg[2]))
                conn.send(("durable",))
            elif kind == "done":
                _wait_all(procs, GRACE_S * 6)
                return msg[1]
            elif kind == "error":
                _failed(procs, msg)
            else:
                raise RuntimeError(f"unexpected message from rank 0: {str(msg)[:200]}")
        for rank, p in enumerate(procs):
            if p.poll() is not None and p.returncode != 0:
                _wait_all(procs[:1], GRACE_S)  # rank 0 reports the error too, or is stuck in a collective
                while conn.poll():
                    with contextlib.suppress(EOFError, OSError):
                        if (msg := conn.recv()) and msg[0] == "error":
                            _failed(procs, msg)
                _lost_if_killed(procs)
                raise RuntimeError(f"training rank {rank} failed ({_status(p.returncode)}; its log is the worker's)")


def _failed(procs: list[subprocess.Popen[bytes]], msg: tuple[Any, ...]) -> None:
    """Rank 0 reported an error: raise it (a consequence, when another rank was killed meanwhile)."""
    _wait_all(procs, GRACE_S)
    _lost_if_killed(procs)
    _, name, code, message = msg
    if code is not None:
        raise CodeTuneError(message, code=code)
    raise RuntimeError(f"{name}: {message}")


def _status(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return signal.Signals(-rc).name
    return f"code {rc}"


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _lost_if_killed(procs: list[subprocess.Popen[bytes]]) -> None:
    """A rank's error is a consequence when another rank was killed (a collective lost its peer)."""
    for rank, p in enumerate(procs):
        if p.poll() is not None and p.returncode < 0:
            _lost(procs, f"rank {rank} exited with {_status(p.returncode)}")


def _lost(procs: list[subprocess.Popen[bytes]], why: str) -> Any:
    time.sleep(POLL_S)  # let a dying rank's siblings finish dying, for the message
    states = ", ".join(f"rank {r}: {'running' if p.poll() is None else _status(p.returncode)}"
                       for r, p in enumerate(procs))
    raise RanksLost(f"training ranks lost: {why} ({states})")


def _end(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill the ranks' process group (every rank, whatever state) and reap them."""
    if any(p.poll() is None for p in procs):  # a live member keeps the group id ours
        try:
            os.killpg(procs[0].pid, signal.SIGKILL)
        except OSError:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for p in procs:
        p.wait()


# --------------------------------------------------------------------------- a rank's side


class _RankZeroHooks:
    """TrainHooks of rank 0: reports go up the socket pair; "stop" comes down it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stopped = False

    def _read(self, msg: Any) -> None:
        if msg == ("stop",):
            self.stopped = True

    def on_step(self, info: StepInfo) -> None:
        self.conn.send(("step", info))

    def on_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        self.conn.send(("checkpoint", str(ckpt_dir), step))
        while (msg := self.conn.recv()) != ("durable",):  # the worker uploads it: training waits
            self._read(msg)

    def should_stop(self) -> bool:
        while not self.stopped and self.conn.poll():
            self._read(self.conn.recv())
        return self.stopped


def _die_with_parent() -> None:
    """SIGKILL this rank when the worker dies (Linux), and exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(os.environ[PARENT_ENV]):
        os._exit(1)


def _rank_main(spec_path: Path) -> int:
    import torch
    import torch.distributed as dist

    from handlers.tuning import recipe

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec: Spec = pickle.loads(spec_path.read_bytes())  # written by our own worker for this attempt
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=spec.store_file.as_uri(), rank=rank,
                            world_size=size, timeout=COLLECTIVE_TIMEOUT)
    conn = Connection(int(os.environ[FD_ENV])) if rank == 0 else None
    hooks: Any = _RankZeroHooks(conn) if conn is not None else recipe.NullHooks()
    try:
        result = recipe.train(spec.base_dir, spec.dataset_path, spec.fmt, spec.hp, spec.out_dir, hooks,
                              spec.resume_dir, lambda *_: (spec.train, spec.val), spec.base)
    except Exception as e:
        if conn is None:
            raise
        code = e.code if isinstance(e, CodeTuneError) else None
        conn.send(("error", type(e).__name__, code, str(e)[:2000]))
        log.exception("rank 0 failed")
        return 1
    if conn is not None:
        conn.send(("done", result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    _die_with_parent()
    sys.exit(_rank_main(Path(sys.argv[1])))
