"""No hangs (search/cluster.py, search/liveness.py): a bad --address fails in seconds, leaving nothing
behind, and a cluster that dies under a running search ends it with one line telling to resume.

The real killed-raylet and killed-GCS runs are in test_cluster.py (slow); here the address probes
run against a closed port and a silent TCP server, and the liveness watch against a fake probe and
clock.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from search_zoo import FIXTURE_EVALS
from tiny_models import write_corrupt_checkpoint
from typer.testing import CliRunner

from evomerge.search.liveness import ClusterLost, ClusterWatch, Liveness, WatchedRayCalls


@pytest.fixture(scope="module")
def spec_folder(zoo, tmp_path_factory) -> Path:
    """A valid spec over garbage-weight models: getting past Ray would fail on reading a weight."""
    root = tmp_path_factory.mktemp("no_hangs")
    models = {}
    for name in ("base", "ft_a", "ft_b"):
        write_corrupt_checkpoint(Path(zoo.model(name)), root / name)
        with (root / name / "model.safetensors").open("ab") as weights:
            weights.write(name.encode())  # distinct garbage: preflight refuses byte-identical models
        models[name] = str(root / name)
    spec = {
        "name": "no-hangs",
        "runs_dir": str(root / "runs"),
        "models": {"base": models["base"], "experts": [models["ft_a"], models["ft_b"]]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 8},
        "budget": {"max_evals": 20},
        "workers": {"count": 1, "device": "cpu"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root


def search_with_address(spec_folder: Path, address: str) -> tuple[int, list[str], float]:
    from evomerge.cli import app

    started = time.monotonic()
    result = CliRunner().invoke(app, ["search", str(spec_folder / "spec.yaml"), "--address", address])
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()], time.monotonic() - started


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again on leaving: nothing listens there


def assert_nothing_left(spec_folder: Path) -> None:
    import ray

    assert not (spec_folder / "runs").exists(), "a run directory was left behind"
    assert not ray.is_initialized()


def test_an_address_where_nothing_listens_fails_in_one_line_and_leaves_nothing(spec_folder):
    code, lines, seconds = search_with_address(spec_folder, f"127.0.0.1:{closed_port()}")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --address: nothing answers at") and "ray start --head" in lines[0]
    assert seconds < 30
    assert_nothing_left(spec_folder)


def test_a_port_that_is_not_a_ray_head_fails_in_one_line_and_leaves_nothing(spec_folder, monkeypatch):
    """The dashboard's 8265 given instead of the GCS port: Ray alone would retry for minutes."""
    from ray._private import services

    from evomerge.search import cluster

    monkeypatch.setattr(cluster, "GCS_TIMEOUT_S", 1.0)
    # Ray reads 127.0.0.1 as this machine's routable IP; the silent server listens on loopback only.
    monkeypatch.setattr(services, "resolve_ip_for_localhost", lambda host: host)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        accepted = []
        threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
        code, lines, seconds = search_with_address(spec_folder, f"127.0.0.1:{server.getsockname()[1]}")
    assert code == 2 and len(lines) == 1, lines
    assert "does not answer as a Ray cluster's head" in lines[0] and "GCS port" in lines[0]
    assert seconds < 30
    assert_nothing_left(spec_folder)


def test_an_existing_run_name_is_refused_before_ray_starts(spec_folder, monkeypatch):
    from evomerge.search import cluster

    run = spec_folder / "runs" / "no-hangs"
    run.mkdir(parents=True)
    (run / "journal.jsonl").write_text("")
    monkeypatch.setattr(cluster.ClusterSession, "open", lambda self: pytest.fail("Ray was started"))
    try:
        code, lines, _ = search_with_address(spec_folder, "127.0.0.1:1")
    finally:
        (run / "journal.jsonl").unlink()
        run.rmdir()
        (spec_folder / "runs").rmdir()
    assert code == 2 and len(lines) == 1 and "already exists" in lines[0], lines


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedProbe:
    def __init__(self, *answers: Liveness):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Liveness:
        self.calls += 1
        return self.answers.pop(0)


def test_a_dead_node_ends_the_search_at_once_telling_to_resume(tmp_path):
    watch = ClusterWatch(tmp_path / "runs" / "r", ScriptedProbe(Liveness.ALIVE, Liveness.NODE_DEAD), FakeClock())
    watch.check()
    watch.clock.now += 5
    with pytest.raises(ClusterLost) as lost:
        watch.check()
    message = str(lost.value)
    assert "raylet" in message and f"evomerge resume {tmp_path / 'runs' / 'r'}" in message
    assert "\n" not in message


def test_an_unreachable_gcs_ends_the_search_only_after_its_grace(tmp_path):
    clock = FakeClock()
    probe = ScriptedProbe(*[Liveness.GCS_UNREACHABLE] * 5)
    watch = ClusterWatch(tmp_path, probe, clock, interval_s=5, gcs_grace_s=20)
    for _ in range(4):  # unreachable at 0, 5, 10, 15 s
        watch.check()
        clock.now += 5
    with pytest.raises(ClusterLost, match="has not answered for 20 s.*evomerge resume"):
        watch.check()


def test_a_gcs_that_answers_again_restarts_the_grace(tmp_path):
    clock = FakeClock()
    unreachable, alive = Liveness.GCS_UNREACHABLE, Liveness.ALIVE
    watch = ClusterWatch(tmp_path, ScriptedProbe(unreachable, unreachable, alive, unreachable, unreachable), clock)
    for _ in range(5):  # 0, 5 unreachable; 10 alive; 15, 20 unreachable: never 20 s in a row
        watch.check()
        clock.now += 5


def test_the_cluster_is_asked_at_most_once_per_interval(tmp_path):
    clock, probe = FakeClock(), ScriptedProbe(*[Liveness.ALIVE] * 3)
    watch = ClusterWatch(tmp_path, probe, clock, interval_s=5)
    for _ in range(11):  # every second for 10 s: probes at 0, 5 and 10 s
        watch.check()
        clock.now += 1
    assert probe.calls == 3


def test_the_scheduler_s_wait_checks_the_cluster_first(tmp_path):
    watch = ClusterWatch(tmp_path, ScriptedProbe(Liveness.NODE_DEAD), FakeClock())
    with pytest.raises(ClusterLost):
        WatchedRayCalls(watch).wait(["a reference"], timeout=1.0)
