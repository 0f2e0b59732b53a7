"""Connecting to Ray and creating worker actors: local cluster by default, or an existing one.

A local cluster is always a fresh one (never a `ray start` cluster that happens to run on the
machine) and listens on 127.0.0.1 only, with the dashboard off. Without GPUs the search runs N CPU
workers, each with its own torch threads.

`--address` is probed before `ray.init`: Ray itself retries an unreachable address for minutes (a
port with nothing behind it hung `search` for over 200 s), so a TCP connect and a GCS request, each
with a timeout, answer within seconds in one line. `ClusterSession` owns the connection for one
command: it stops a local cluster it started on every way out (an exception, Ctrl-C, SIGTERM) and
then kills what `ray.shutdown()` leaves behind: Ray's agents, children of the raylet, otherwise
outlive the driver by minutes. A second Ctrl-C or SIGTERM while it stops is answered with one line
and otherwise ignored, so the stop always completes. Ray's own log lines (its start-up notices,
the token-authentication warning) go to the run's `ray.log` (`RayLog` holds them until the run
directory exists), not to the user's terminal; token authentication itself stays as Ray sets it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from evomerge.errors import Stopped, UserError
from evomerge.preflight import Prepared
from evomerge.search.liveness import ClusterWatch, WatchedRayCalls, ray_liveness
from evomerge.search.worker import WorkerSettings, ray_worker_class
from evomerge.spec import Spec

TCP_TIMEOUT_S = 5.0
GCS_TIMEOUT_S = 5.0
REAP_TIMEOUT_S = 5.0
RUNTIME_ENV = {
    "env_vars": {
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
}
# Where the driver found the hub's models and datasets, and whether it may reach the hub: workers on
# other nodes read the same caches in the same mode. The token stays out: Ray shows a job's runtime
# environment on its dashboard, and workers read only what the driver already fetched.
HUB_SETTINGS = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def runtime_env() -> dict:
    """The job's runtime environment: RUNTIME_ENV plus the driver's hub settings."""
    hub = {name: os.environ[name] for name in HUB_SETTINGS if name in os.environ}
    return {"env_vars": {**RUNTIME_ENV["env_vars"], **hub}}


def connect(spec: Spec, address: str | None) -> None:
    """Join the cluster at `address` (probed first) or start a local one; nothing if Ray is up."""
    import ray

    if ray.is_initialized():
        return
    if address:
        gcs_address = probe_address(address)
        try:
            ray.init(address=gcs_address, runtime_env=runtime_env(), log_to_driver=False)
        except ConnectionError as error:
            raise UserError(
                f"--address: cannot join the Ray cluster at {address} ({error}); start one with 'ray start --head' or drop --address"
            ) from None
    else:
        cpus = max(os.cpu_count() or 1, int(_worker_count(spec, gpus=_local_gpus()) * spec.workers.cpus_per_worker))
        _start_loopback_cluster(num_cpus=cpus, runtime_env=runtime_env())


def probe_address(address: str) -> str:
    """The GCS address `ray.init` would use for `address`, checked to answer; UserError otherwise."""
    from ray._private import services

    try:
        # Ray's own reading of "auto" (the last `ray start` on this machine) and of host:port.
        gcs_address = services.canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as error:
        raise UserError(f"--address: {error}; start a cluster with 'ray start --head' or drop --address") from None
    host, _, port = gcs_address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TCP_TIMEOUT_S):
            pass
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        where = address if gcs_address == address else f"{address} ({gcs_address})"
        raise UserError(
            f"--address: nothing answers at {where}: {reason}; start the head with 'ray start --head --port={port}', fix the address, or drop --address for a local cluster"
        ) from None
    _check_gcs_answers(address, gcs_address)
    return gcs_address


def _check_gcs_answers(address: str, gcs_address: str) -> None:
    """A TCP port that is open is not yet a Ray head (the dashboard's 8265 is a common mix-up)."""
    from ray._raylet import InnerGcsClient

    try:
        with _native_stderr_silenced():  # Ray's C++ client logs each retry to fd 2
            client = InnerGcsClient.standalone(gcs_address, None, int(GCS_TIMEOUT_S * 1000))
            client.check_alive([], timeout=GCS_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - whatever fails, it is not a usable Ray head
        detail = (str(error).strip() or type(error).__name__).splitlines()[0]
        if "InvalidAuthToken" in detail:
            raise UserError(
                f"--address: the Ray cluster at {address} wants an authentication token this driver does not have; set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
            ) from None
        raise UserError(
            f"--address: {address} does not answer as a Ray cluster's head (GCS) within {GCS_TIMEOUT_S:.0f} s ({detail[:200]}); give the head's GCS port (6379 unless 'ray start --head --port' said otherwise)"
        ) from None


@contextlib.contextmanager
def _native_stderr_silenced():
    stderr_fd = 2
    saved = os.dup(stderr_fd)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), stderr_fd)
        yield
    finally:
        os.dup2(saved, stderr_fd)
        os.close(saved)


def _start_loopback_cluster(**options) -> None:
    """ray.init a new single-machine cluster whose every server listens on 127.0.0.1 only."""
    import ray
    from ray._private import ray_constants

    # Ray treats "127.0.0.1" as "this machine's routable IP" and then listens on all interfaces,
    # unless it believes it runs a single-machine cluster, which a local search is.
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


class ClusterSession:
    """Ray for one command: connects on `open()`, and on `close()` stops what it started.

    Re-entrant: a session opened while Ray is already up (a caller's session) leaves Ray to it.
    """

    def __init__(self, spec: Spec, address: str | None):
        self.spec = spec
        self.address = address
        self.connected = False  # this session called ray.init
        self.local_processes: list = []  # psutil.Process of a local cluster this session started
        self._previous_handlers: dict[int, object] = {}
        self._ray_handlers: list[logging.Handler] | None = None

    def __enter__(self) -> ClusterSession:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        import ray

        if ray.is_initialized():
            return
        before = _own_processes()
        self._ray_logs_to_file()
        try:
            connect(self.spec, self.address)
        except BaseException:
            self._restore_ray_logs()
            raise
        self.connected = True
        if self.address is None:
            self.local_processes = [p for key, p in _own_processes().items() if key not in before]
        self._interrupt_on_termination()

    def watched_calls(self, run_dir: Path) -> WatchedRayCalls:
        """Scheduler calls that end the search with ClusterLost once the cluster is gone."""
        return WatchedRayCalls(ClusterWatch(run_dir, ray_liveness))

    def close(self) -> None:
        if not self.connected:
            return
        import ray

        self.connected = False
        self._patient_while_stopping()
        try:
            started = _with_descendants(self.local_processes)
            ray.shutdown()
            _kill_leftovers(started)
        finally:
            self._restore_handlers()
            self._restore_ray_logs()

    def _ray_logs_to_file(self) -> None:
        """Take the "ray" logger (Ray sets it up to print to stderr) for a `RayLog`."""
        import ray  # noqa: F401 - importing ray installs its handlers, which are replaced here

        ray_logger = logging.getLogger("ray")
        self._ray_handlers = list(ray_logger.handlers)
        ray_logger.handlers = [RayLog()]

    def _restore_ray_logs(self) -> None:
        if self._ray_handlers is None:
            return
        ray_logger = logging.getLogger("ray")
        for handler in ray_logger.handlers:
            handler.close()
        ray_logger.handlers = self._ray_handlers
        self._ray_handlers = None

    def _patient_while_stopping(self) -> None:
        """While the cluster stops, another Ctrl-C or SIGTERM must not cut the cleanup short."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers.setdefault(signum, signal.getsignal(signum))
            if self._previous_handlers[signum] is not signal.SIG_IGN:
                signal.signal(signum, _still_stopping)

    def _interrupt_on_termination(self) -> None:
        """SIGTERM (a batch system's stop, `kill`) unwinds like Ctrl-C, so every cleanup runs; after
        the first stop signal, later ones are answered and ignored until the cluster has stopped."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:  # nohup: a hang-up is meant to be ignored
                continue
            self._previous_handlers[signum] = previous
            signal.signal(signum, _raise_keyboard_interrupt)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


class RayLog(logging.Handler):
    """Ray's log records, held in memory until the run's log file is known (Ray starts before the
    run directory exists), then written there."""

    HELD_AT_MOST = 1000

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < self.HELD_AT_MOST:
            self.held.append(record)

    def write_to(self, path: Path) -> None:
        if self.file is not None:
            return
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        for record in self.held:
            self.file.emit(record)
        self.held.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def keep_ray_logs_in(path: Path) -> None:
    """Write Ray's log lines, those held since it started and all later ones, to `path`."""
    for handler in logging.getLogger("ray").handlers:
        if isinstance(handler, RayLog):
            handler.write_to(path)


def _raise_keyboard_interrupt(signum, frame) -> None:
    for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(other) is _raise_keyboard_interrupt:
            signal.signal(other, _still_stopping)
    raise Stopped(signum)


def _still_stopping(signum, frame) -> None:
    os.write(2, b"stopping: shutting Ray down, a few seconds\n")


def _psutil():
    """Ray's bundled psutil: importing ray puts it on sys.path (evomerge does not depend on psutil)."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _own_processes() -> dict:
    """This process's descendants, keyed by (pid, start time) so a reused pid is not mistaken."""
    psutil = _psutil()
    processes = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            processes[(process.pid, process.create_time())] = process
    return processes


def _with_descendants(processes: list) -> list:
    psutil = _psutil()
    found = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            found += process.children(recursive=True)
    return found


def _kill_leftovers(processes: list) -> None:
    """SIGKILL what survived ray.shutdown(): a graceful stop is what left them hanging."""
    psutil = _psutil()
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()  # psutil refuses a pid that now belongs to another process
            alive.append(process)
    psutil.wait_procs(alive, timeout=REAP_TIMEOUT_S)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _worker_count(spec: Spec, gpus: int) -> int:
    if spec.workers.count:
        return spec.workers.count
    if _device(spec, gpus) == "cuda":
        return max(1, int(gpus / spec.workers.gpus_per_worker))
    return 2


def _device(spec: Spec, gpus: int) -> str:
    if spec.workers.device == "auto":
        return "cuda" if gpus else "cpu"
    if spec.workers.device == "cuda" and not gpus:
        raise UserError("workers.device: cuda was asked for but the cluster has no GPU; use device: cpu or auto")
    return spec.workers.device


def make_actor_factory(prepared: Prepared, spec: Spec):
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = _device(spec, gpus)
    count = _worker_count(spec, gpus)
    settings = WorkerSettings(
        base_model=prepared.sources.folder(spec.models.base),
        union_config=prepared.union_config,
        model_folders={name: folder for name, folder in prepared.sources.folders().items() if name != folder},
        eval_sets=prepared.eval_sets,
        device=device,
        dtype=spec.merge.dtype,
        cpu_threads=max(1, int(spec.workers.cpus_per_worker)),
        trust_remote_code=spec.trust_remote_code,
        merge_seed=spec.optimizer.seed,
        merge_method=tuple(spec.merge.methods),
        devices=_worker_devices(spec, device),
        layer_paths=spec.search.layers,
    )
    actor_class = ray_worker_class(
        spec.workers.cpus_per_worker, spec.workers.gpus_per_worker if device == "cuda" else 0
    )

    def make_actor(index: int):
        return actor_class.remote(settings, f"w{index}")

    return make_actor, count


def _worker_devices(spec: Spec, device: str) -> tuple[str, ...]:
    """k > 1 GPUs per worker: Ray shows the actor its k GPUs as cuda:0..k-1, its layers are split over them."""
    per_worker = spec.workers.gpus_per_worker
    return tuple(f"cuda:{index}" for index in range(int(per_worker))) if device == "cuda" and per_worker > 1 else ()
