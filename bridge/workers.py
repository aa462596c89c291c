"""``bridge serve --workers N``: N bridge processes on one port, one per core, supervised.

The supervisor (this module, in the process ``bridge serve`` started) holds every socket and
no call: it binds the public port N times with ``SO_REUSEPORT`` (the kernel spreads new
connections over the N sockets by their address hash, evenly, where one shared socket lets the
least busy process take most), and one private port per worker, then starts each worker as
``python -m bridge serve`` with its two sockets inherited. A worker is a whole bridge: a
replica of its own (instance id ``INSTANCE_ID-K``, private address: ``plan_workers``), on the
same database, so everything that
works across replicas works across the workers of a machine: stop-call and control requests
(PostgreSQL's ``NOTIFY``, or on SQLite signed UDP datagrams on loopback:
``bridge.store.control.WorkerGroup``), listen-live (a listener that lands on another worker is
passed to the private address of the one relaying the call), the call-events feed (read from
the database), the shared dial rate (``SqlCallStore.take_slot``), leases and reaping.

- A worker that dies (a crash, the OOM killer) is started again within a second under a new
  instance id (``INSTANCE_ID-K.R``: the restart never waits out the dead one's lease); its
  socket stays bound and listening in the supervisor meanwhile, so connections hashed to it wait
  in its queue rather than fail (at the first start a worker's socket listens only once that
  worker is ready: nothing waits on a worker still starting); the calls it relayed are reaped by the other workers when its lease
  expires, as a dead replica's are. One that keeps dying right after its start is started
  again after a growing pause (up to ``MAX_BACKOFF_S``); one that exits 2 on its first start
  (bad settings: the same for all) stops the whole bridge with that code.
- SIGTERM drains every worker (each as ``DrainingServer``); the supervisor exits 0 once all have
  exited 0. SIGINT, or a second SIGTERM, is passed on as such (stop now). Workers get SIGTERM
  if the supervisor itself dies (``PR_SET_PDEATHSIG``).
- ``/metrics`` on any worker covers them all (``bridge.metrics.merge_expositions``).
- Each worker reaches its own embedded agents (the echo agent) at its private address
  (``internal_url``, unless that is set): a call and its agent live and drain together.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .settings import Settings

log = logging.getLogger(__name__)

#: the environment variable that hands a worker its sockets: "PUBLIC_FD,PRIVATE_FD"
SOCKETS_ENV = "_BRIDGE_WORKER_FDS"
POLL_S = 0.2
#: a worker that exits within this long of its start was not well: the next start waits longer
QUICK_EXIT_S = 10.0
MAX_BACKOFF_S = 30.0
PR_SET_PDEATHSIG = 1


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def public_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` sockets bound to ``host:port`` sharing it (``SO_REUSEPORT``); port 0 takes a free
    port for all. Raises OSError when the port is another program's."""
    made: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            # not listening yet: the worker's server listens once its start-up is complete, so
            # no connection waits in the queue of a worker still starting (once listening, the
            # socket stays so here: a restarted worker takes over what queued meanwhile)
            sock.set_inheritable(True)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


def private_socket(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), family=_family(host), backlog=512)
    sock.set_inheritable(True)
    return sock


@dataclass
class Worker:
    index: int  # 1..N
    public: socket.socket
    private: socket.socket
    address: str  # its private base URL
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = 0.0
    due_at: float | None = None  # when to start it again (None: running, or not to be started)
    exit_codes: list[int] = field(default_factory=list)

    @property
    def instance_suffix(self) -> str:
        return f"{self.index}" if self.restarts == 0 else f"{self.index}.{self.restarts}"


def plan_workers(settings: Settings, n: int) -> list[Worker]:
    """Bind every socket the workers will serve on (raises OSError, naming nothing: the caller
    says which port). A worker's private address: ``replica_url``'s host with its port + K - 1
    when ``replica_url`` is set (the other machines' replicas reach each worker there), else a
    free port on ``host`` (this machine's address for a wildcard host). When ``replica_url``'s
    port is the public port (a pod's ``http://POD_IP:8080``), the workers take the ports after it
    (8081, 8082...)."""
    publics = public_sockets(settings.host, settings.port, n)
    workers = []
    try:
        for k in range(1, n + 1):
            if settings.replica_url:
                parts = urlsplit(settings.replica_url)
                base_port = parts.port or (443 if parts.scheme == "https" else 80)
                port = base_port + k - (0 if base_port == settings.port else 1)  # (never the public port itself)
                private = private_socket(settings.host, port)
                address = f"{parts.scheme}://{parts.hostname}:{port}"
            else:
                private = private_socket(settings.host, 0)
                address = settings.model_copy(update={"port": private.getsockname()[1]}).replica_base
            workers.append(Worker(k, publics[k - 1], private, address))
    except OSError:
        for sock in publics + [w.private for w in workers]:
            sock.close()
        raise
    return workers


def _die_with_parent() -> None:  # (in the child, before exec)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: a supervisor killed -9 leaves its workers
        pass


class Supervisor:
    def __init__(self, settings: Settings, workers: list[Worker], env: dict[str, str]):
        self.settings = settings
        self.workers = workers
        self.env = env  # the workers' environment (the command line's options as BRIDGE_* too)
        self.stopping: int | None = None  # the signal being passed on
        self.signals = 0

    def _environment(self, worker: Worker) -> dict[str, str]:
        return {
            **self.env,
            "BRIDGE_WORKERS": str(len(self.workers)),
            "BRIDGE_INSTANCE_ID": f"{self.settings.instance_id}-{worker.instance_suffix}",
            "BRIDGE_REPLICA_URL": worker.address,
            "BRIDGE_WORKER_ADDRESSES": ",".join(w.address for w in self.workers),
            "BRIDGE_PORT": str(worker.public.getsockname()[1]),
            # a call's embedded agent (the echo agent) is served by the worker relaying the call:
            # through the public port it could land on another, which may drain and stop first
            "BRIDGE_INTERNAL_URL": self.settings.internal_url or worker.address,
            SOCKETS_ENV: f"{worker.public.fileno()},{worker.private.fileno()}",
        }

    def start(self, worker: Worker) -> None:
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve"],
            env=self._environment(worker),
            pass_fds=(worker.public.fileno(), worker.private.fileno()),
            start_new_session=True,  # (a terminal's Ctrl-C reaches the supervisor, which passes it on once)
            preexec_fn=_die_with_parent,
        )
        worker.started_at, worker.due_at = time.monotonic(), None
        log.info("worker %d started (pid %d, instance %s-%s, %s)", worker.index, worker.process.pid,
                 self.settings.instance_id, worker.instance_suffix, worker.address)  # fmt: skip

    def _signal(self, sig: int, _frame=None) -> None:
        self.signals += 1
        if sig == signal.SIGTERM and self.signals > 1:
            sig = signal.SIGINT  # (a second SIGTERM: stop now, as for one process)
        self.stopping = sig
        for worker in self.workers:
            worker.due_at = None
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(sig)

    def run(self) -> int:
        """Start the workers and keep them running until a signal; the exit code."""
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        for worker in self.workers:
            self.start(worker)
        try:
            return self._supervise()
        finally:
            for worker in self.workers:
                if worker.process is not None and worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()
                worker.public.close()
                worker.private.close()

    def _supervise(self) -> int:
        while True:
            time.sleep(POLL_S)
            now = time.monotonic()
            running = 0
            for worker in self.workers:
                process = worker.process
                if process is not None and (code := process.poll()) is None:
                    running += 1
                    continue
                if process is not None:  # it exited just now
                    worker.process = None
                    worker.exit_codes.append(code)
                    if self.stopping is None:
                        if code == 2 and worker.restarts == 0 and now - worker.started_at < QUICK_EXIT_S:
                            log.error("worker %d could not start (exit 2): stopping", worker.index)
                            self._signal(signal.SIGINT)
                            continue
                        quick = now - worker.started_at < QUICK_EXIT_S
                        worker.backoff_s = min(MAX_BACKOFF_S, max(1.0, worker.backoff_s * 2)) if quick else 0.0
                        worker.due_at = now + worker.backoff_s
                        log.error("worker %d (pid %d) exited with %s: starting it again%s", worker.index, process.pid, code,
                                  f" in {worker.backoff_s:g} s" if worker.backoff_s else "")  # fmt: skip
                if worker.due_at is not None and now >= worker.due_at and self.stopping is None:
                    worker.restarts += 1
                    self.start(worker)
                    running += 1
                elif worker.due_at is not None:
                    running += 1  # (to be started again)
            if running == 0:
                failed = [w.exit_codes[-1] for w in self.workers if w.exit_codes and w.exit_codes[-1] != 0]
                return failed[0] if failed else 0


def inherited_sockets() -> list[socket.socket] | None:
    """In a worker: the public and private sockets the supervisor handed over (else None)."""
    fds = os.environ.get(SOCKETS_ENV)
    if not fds:
        return None
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
