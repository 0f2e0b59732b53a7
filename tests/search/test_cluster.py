"""Real Ray clusters on this machine: a three-node cluster that loses a node mid-search, and the
local cluster every plain `evomerge search` starts, which must listen on 127.0.0.1 only.

Every node is a `ray start --block` process in its own session on 127.0.0.1 with its own token and
temp dir, so the test never touches another Ray instance on the machine and can kill exactly its
own processes. Ray 2.60 rewrites 127.0.0.1 to the machine's routable IP and then listens on every
interface unless told the machine is a single-node cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
which `ray start` refuses for a worker node; the worker nodes are therefore started through `ray
start`'s own entry point with that rewrite turned off (RAY_START below).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from search_zoo import FIXTURE_EVALS

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent
RAY_START = (
    "import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; main()"
)
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


class LoopbackCluster:
    """A head (no CPUs: it only coordinates) and worker nodes, each a process group of its own."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = tempfile.mkdtemp(prefix="evc", dir="/tmp")  # Ray's socket paths must stay short
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.driver_env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, str] = {}  # pid -> node, for every process seen on a node

    def start(self, name: str, command: list[str], env: dict) -> None:
        options = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        log = (self.root / f"{name}.log").open("w")
        self.nodes[name] = subprocess.Popen(
            [*command, *options], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_until_started(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in (self.root / f"{name}.log").read_text():
            alive = self.nodes[name].poll() is None
            assert alive and time.monotonic() < deadline, (
                f"{name} did not start:\n{(self.root / f'{name}.log').read_text()[-3000:]}"
            )
            time.sleep(0.5)

    def start_all(self, workers: dict[str, int]) -> None:
        port = self.address.rsplit(":", 1)[1]
        self.start(
            "head",
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"],
            self.driver_env,
        )
        self.wait_until_started("head")
        for name, cpus in workers.items():  # one at a time: nodes joining together can time out on a busy machine
            self.start(
                name,
                [sys.executable, "-c", RAY_START, "start", f"--address={self.address}", f"--num-cpus={cpus}"],
                self.env,
            )
            self.wait_until_started(name)

    def record_workers(self) -> None:
        """Note which node each live process belongs to (workers are children of their raylet)."""
        groups = {node.pid: name for name, node in self.nodes.items() if node.poll() is None}
        for process in psutil.process_iter():
            if _group_of(process) in groups:
                for member in [process, *_children(process)]:
                    self.seen.setdefault(member.pid, groups[_group_of(process)])

    def lose_node(self, name: str) -> None:
        """Everything of one node dies at once, as when its machine goes away."""
        self.record_workers()
        members = [pid for pid, node in self.seen.items() if node == name]
        kill_group(self.nodes[name].pid)
        for pid in members:  # workers run in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.nodes[name].wait(timeout=60)

    def stop(self) -> None:
        for node in self.nodes.values():
            kill_group(node.pid)
        for node in self.nodes.values():
            node.wait(timeout=60)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_of(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def pid_of(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


NODE_LOSS_EVALS = 16


def write_spec(folder: Path, zoo) -> Path:
    """Two CPU workers on a task whose scoring sleeps 50 ms a doc (3 s a candidate, whatever the scorer),
    so the search is still running when the test takes a node away."""
    evals = folder / "evals"
    (evals / "data").mkdir(parents=True)
    (evals / "data" / "slow.jsonl").write_text((FIXTURE_EVALS / "data" / "tiny.jsonl").read_text())
    (evals / "slow_scoring.py").write_text(
        "import time\n\n\ndef process_results(doc, results):\n"
        "    time.sleep(0.05)\n"
        "    return {'acc': float(results[0][1])}\n"
    )
    (evals / "slow_add.yaml").write_text(
        (FIXTURE_EVALS / "tiny_add.yaml")
        .read_text()
        .replace("task: tiny_add", "task: slow_add\nprocess_results: !function slow_scoring.process_results")
        .replace("tiny.jsonl", "slow.jsonl")
        .split("  - metric: perplexity")[0]
    )
    spec = {
        "name": "three-nodes",
        "runs_dir": str(folder / "runs"),
        "models": {"base": zoo.model("base"), "experts": [zoo.model("ft_a"), zoo.model("ft_b")]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "optimizer": {"name": "random", "seed": 0},
        "evaluation": {"include": [str(evals)], "tasks": ["slow_add"], "limit": 60, "batch_size": 64},
        "budget": {"max_evals": NODE_LOSS_EVALS},
        "workers": {"count": 2, "cpus_per_worker": 1},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def search_losing_a_node(cluster: LoopbackCluster, spec_path: Path, run_dir: Path) -> tuple[int, str, float]:
    """Run the search; lose the node that produced the first result. (exit code, lost node, when)."""
    with (run_dir.parent.parent / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [str(BIN / "evomerge"), "search", str(spec_path), "--address", cluster.address],
            env=cluster.driver_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not (done := [e for e in journal(run_dir) if e["event"] == "completed"]):
            assert driver.poll() is None and time.monotonic() < deadline, "no result from the cluster"
            cluster.record_workers()
            time.sleep(0.2)
        lost = cluster.seen.get(pid_of(done[0]["worker"]))
        assert lost in ("node_a", "node_b"), "workers run on the worker nodes, not on the CPU-less head"
        cluster.lose_node(lost)
        lost_at = time.time()
        deadline = time.monotonic() + 400
        while driver.poll() is None:
            assert time.monotonic() < deadline, "the search did not finish after losing a node"
            cluster.record_workers()
            time.sleep(0.2)
        return driver.returncode, lost, lost_at
    finally:
        kill_group(driver.pid)


def test_search_survives_losing_a_node_of_a_three_node_cluster(tmp_path, zoo):
    spec_path = write_spec(tmp_path, zoo)
    run_dir = tmp_path / "runs" / "three-nodes"
    cluster = LoopbackCluster(tmp_path)
    try:
        cluster.start_all({"node_a": 2, "node_b": 2})
        code, lost, lost_at = search_losing_a_node(cluster, spec_path, run_dir)
    finally:
        cluster.stop()
    stderr = (tmp_path / "driver.log").read_text()
    assert code == 0, stderr[-3000:]
    assert "worker died" in stderr and "re-queueing" in stderr
    events = journal(run_dir)
    completed = [e["trial"] for e in events if e["event"] == "completed"]
    assert (
        sorted(completed) == sorted({e["trial"] for e in events if e["event"] == "asked"})
        and len(completed) == NODE_LOSS_EVALS
    )
    assert not any(e["event"] == "failed" for e in events), "a lost node is not a failed candidate"
    after = [e for e in events if e["event"] == "completed" and e["time"] > lost_at + 1]
    survivor = "node_b" if lost == "node_a" else "node_a"
    assert after and {cluster.seen.get(pid_of(e["worker"])) for e in after} == {survivor}, (
        "work goes on on the surviving node"
    )


LISTENERS_SCRIPT = """
import json, sys, psutil, ray
from pathlib import Path
from evomerge.search.cluster import connect
from evomerge.spec import parse_spec
spec = parse_spec({"name": "probe", "models": {"base": "b", "experts": ["e"]}, "evaluation": {"tasks": ["t"]}, "workers": {"count": 1}}, "spec", Path("/"))
connect(spec, None)
ray.get(ray.remote(lambda: 1).remote())  # a worker process listens too
def listening(process):
    try:  # a short-lived helper process may exit between the listing and this call
        return [(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []
listeners = [entry for p in psutil.Process().children(recursive=True) for entry in listening(p)]
print(json.dumps(listeners))
ray.shutdown()
"""


def test_local_cluster_listens_on_loopback_only_without_a_dashboard():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", LISTENERS_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    listeners = json.loads(probe.stdout.strip().splitlines()[-1])
    assert {name for name, _, _ in listeners} >= {"gcs_server", "raylet"}
    assert {ip for _, ip, _ in listeners} <= LOOPBACK, f"listening beyond loopback: {listeners}"
    assert 8265 not in {port for _, _, port in listeners}, "the dashboard is up"


MANY = 2000


class LocalSearch:
    """`evomerge search` on its own local cluster, in a session of its own, with every process it
    starts recorded (Ray's workers and agents run in process groups of their own)."""

    def __init__(self, folder: Path, zoo):
        self.spec_path = write_spec(folder, zoo)
        spec = yaml.safe_load(self.spec_path.read_text())
        spec["budget"]["max_evals"] = MANY  # still searching when the test strikes
        self.spec_path.write_text(yaml.safe_dump(spec))
        self.run_dir = folder / "runs" / "three-nodes"
        self.log_path = folder / "driver.log"
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        with self.log_path.open("w") as log:
            self.driver = subprocess.Popen(
                [str(BIN / "evomerge"), "search", str(self.spec_path)],
                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def record(self) -> None:
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.driver.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault((process.pid, process.create_time()), process)

    def wait_for_a_result(self) -> None:
        deadline = time.monotonic() + 300
        while not any(e["event"] == "completed" for e in journal(self.run_dir)):
            assert self.driver.poll() is None and time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            self.record()
            time.sleep(0.2)
        self.record()

    def process_named(self, name: str) -> psutil.Process:
        return next(p for p in self.seen.values() if _name(p) == name)

    def wait_for_exit(self, limit: float) -> float:
        """Seconds the driver took to exit; it is killed (and the test fails) after `limit` + 30."""
        started = time.monotonic()
        try:
            self.driver.wait(timeout=limit + 30)
        except subprocess.TimeoutExpired:
            kill_group(self.driver.pid)
            pytest.fail(f"the driver hung:\n{self.log_path.read_text()[-3000:]}")
        return time.monotonic() - started

    def leftovers(self) -> list[str]:
        """Processes of its cluster still running 10 s after the driver exited (the agents lingered minutes)."""
        deadline = time.monotonic() + 10
        while alive := [f"{_name(p)}:{p.pid}" for p in self.seen.values() if _running(p)]:
            if time.monotonic() > deadline:
                for process in self.seen.values():
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                return alive
            time.sleep(0.5)
        return []

    def stderr_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.strip()]


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.long  # about 90 s for both; losing a whole node (above) stays in CI
@pytest.mark.parametrize("server", ["raylet", "gcs_server"])
def test_a_killed_raylet_or_gcs_ends_the_search_within_a_minute_telling_to_resume(server, tmp_path, zoo):
    search = LocalSearch(tmp_path, zoo)
    try:
        search.wait_for_a_result()
        search.process_named(server).kill()
        seconds = search.wait_for_exit(limit=60)
    finally:
        kill_group(search.driver.pid)
    lines = search.stderr_lines()
    assert search.driver.returncode == 2, lines[-20:]
    assert seconds < 60, f"took {seconds:.0f} s"
    assert lines[-1].startswith("error: ") and f"evomerge resume {search.run_dir}" in lines[-1], lines[-5:]
    assert "Traceback" not in search.log_path.read_text()
    assert not search.leftovers(), "Ray processes outlived the driver"
    assert journal(search.run_dir)[-1]["event"] != "run_finished"


def test_sigterm_stops_the_search_and_its_whole_local_cluster(tmp_path, zoo):
    search = LocalSearch(tmp_path, zoo)
    try:
        search.wait_for_a_result()
        agents = [p for p in search.seen.values() if "Agent" in _name(p) or "agent" in " ".join(_cmdline(p))]
        search.driver.send_signal(signal.SIGTERM)
        search.wait_for_exit(limit=60)
    finally:
        kill_group(search.driver.pid)
    lines = search.stderr_lines()
    assert search.driver.returncode == 143 and lines[-1].startswith("interrupted: "), lines[-5:]  # 128 + SIGTERM
    assert f"'evomerge resume {search.run_dir}'" in lines[-1]
    # Ray's own start-up lines (token authentication, "Started a local Ray instance") go to the run's ray.log.
    assert not any(" -- " in line and ("WARNING" in line or "INFO" in line) for line in lines), lines[:5]
    assert "Started a local Ray instance" in (search.run_dir / "ray.log").read_text()
    assert agents, "the test saw no Ray agent to check"
    assert not search.leftovers(), "Ray processes outlived the driver"
    assert any(f"] search started: 0/{MANY} evaluations" in line for line in lines), "no status line without a terminal"


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
