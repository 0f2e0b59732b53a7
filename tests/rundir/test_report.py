"""`evomerge report`: the journal-to-numbers functions, the files it writes, and the page as a real
headless Chromium renders it (no console errors, every image decoded).

Runs are synthesized as spec.yaml + journal.jsonl with the events a search writes, so no search
is needed. The browser is driven over the DevTools protocol on `--remote-debugging-pipe` (NUL-
terminated JSON on fds 3 and 4), which needs no websocket package.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import json
import os
import re
import select
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.rundir.genes import rows_from_names
from evomerge.rundir.report import gene_grids, write_report

TASKS = ("arc_easy", "hellaswag", "piqa")
HELDOUT_TASKS = ("mmlu_mini", "winogrande")
EXPERTS = ("/models/math-expert", "/models/code-expert")
BASELINES = ("base", "parent:math-expert", "parent:code-expert", "ties (density=0.5)")


def _genes(groups: int) -> list[str]:
    names = []
    for param, model in itertools.product(("weight", "density"), range(len(EXPERTS))):
        names += [f"{param}/m{model}/g{g}/{part}" for g in range(groups) for part in ("attn", "mlp")]
        names += [f"{param}/m{model}/gembed", f"{param}/m{model}/ghead"]
    return names


def _result(rng, score: float, tasks, n_docs: int = 200, tilt: float = 0.0) -> dict:
    """Per-task accuracies around `score`; `tilt` trades the first tasks against the last one."""
    shifts = [tilt if index < len(tasks) - 1 else -tilt for index in range(len(tasks))]
    metrics = {
        task: float(np.clip(score + shift + rng.normal(0, 0.03), 0, 1))
        for task, shift in zip(tasks, shifts, strict=False)
    }
    return {
        "ok": True,
        "score": float(np.mean(list(metrics.values()))),
        "metrics": metrics,
        "n_docs": dict.fromkeys(tasks, n_docs),
    }


def make_run(
    root: Path, *, trials: int = 36, failures=(5, 17), objectives: bool = False, heldout: bool = True, seed: int = 0
) -> Path:
    """A finished CMA-ES run directory: baselines, improving evolved trials, failures, held-out re-scores."""
    rng = np.random.default_rng(seed)
    run_dir = root / "runs" / "demo-ties"
    run_dir.mkdir(parents=True)
    spec = {
        "name": "demo-ties",
        "models": {"base": "/models/base", "experts": list(EXPERTS)},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 4, "split_attn_mlp": True, "embeddings": True},
        "optimizer": {"name": "cmaes", "popsize": 6},
        "evaluation": {
            "tasks": [{"name": t} for t in TASKS],
            "heldout_tasks": [{"name": t} for t in HELDOUT_TASKS] if heldout else [],
        },
        "budget": {"max_evals": trials + len(BASELINES)},
    }
    if objectives:
        spec["evaluation"]["objectives"] = [
            {"name": "reasoning", "tasks": list(TASKS[:-1])},
            {"name": "commonsense", "tasks": [TASKS[-1]]},
        ]
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    clock = itertools.count(1_700_000_000, 17)
    genes = [  # 16 layers in 4 groups of 4, as the genome journals them
        {**row.to_json(), "layers": [4 * row.group, 4 * row.group + 4] if isinstance(row.group, int) else None}
        for row in rows_from_names(_genes(4))
    ]
    events = [{"event": "run_started", "time": next(clock), "spec_fingerprint": "0" * 16, "workers": 2, "genes": genes}]

    def finish(trial: int, score: float, kind: str):
        if kind == "failed":
            events.append(
                {
                    "event": "failed",
                    "time": next(clock),
                    "trial": trial,
                    "ok": False,
                    "reason": "CUDA out of memory while merging",
                }
            )
            return
        result = _result(rng, score, TASKS, tilt=float(rng.uniform(-0.08, 0.08)) if objectives else 0.0)
        metrics = result["metrics"]
        extra = (
            {"objectives": [float(np.mean([metrics[t] for t in TASKS[:-1]])), metrics[TASKS[-1]]]} if objectives else {}
        )
        events.append(
            {
                "event": "completed",
                "time": next(clock),
                "trial": trial,
                **result,
                "worker": "w0",
                "merge_s": 1.0,
                "eval_s": 9.0,
                **extra,
            }
        )

    for index, label in enumerate(BASELINES):
        events.append(
            {
                "event": "asked",
                "time": next(clock),
                "trial": -1 - index,
                "kind": "baseline",
                "label": label,
                "x": None,
                "params": {},
                "merge_config": {},
            }
        )
        finish(-1 - index, 0.42 + 0.04 * index, "completed")
    for trial in range(trials):
        params = {name: round(float(rng.uniform(0.1, 1.0)), 6) for name in _genes(4)}
        events.append(
            {
                "event": "asked",
                "time": next(clock),
                "trial": trial,
                "kind": "optimizer",
                "label": f"trial {trial}",
                "x": [],
                "params": params,
                "merge_config": {},
            }
        )
        finish(
            trial,
            0.45 + 0.18 * (1 - np.exp(-trial / 10)) + rng.normal(0, 0.02),
            "failed" if trial in failures else "completed",
        )
    if heldout:
        completed = [e for e in events if e["event"] == "completed"]
        for event in [e for e in completed if e["trial"] < 0] + sorted(
            (e for e in completed if e["trial"] >= 0), key=lambda e: -e["score"]
        )[:3]:
            events.append(
                {
                    "event": "heldout",
                    "time": next(clock),
                    "trial": event["trial"],
                    **_result(rng, event["score"] - 0.02, HELDOUT_TASKS),
                }
            )
    events.append(
        {"event": "run_finished", "time": next(clock), "completed": sum(e["event"] == "completed" for e in events)}
    )
    (run_dir / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


# --- journal-to-numbers -----------------------------------------------------------------------


def test_gene_grids_lay_out_models_parts_and_embed_head_columns():
    params = {
        "weight/m0/g0/attn": 0.1,
        "weight/m0/g0/mlp": 0.2,
        "weight/m0/g1/attn": 0.3,
        "weight/m0/g1/mlp": 0.4,
        "weight/m0/gembed": 0.5,
        "weight/m0/ghead": 0.6,
        "t/all/g0": 0.7,
        "t/all/g1": 0.8,
    }
    weight, shared = gene_grids(params, ["math"])
    assert (weight.param, weight.columns, weight.rows) == (
        "weight",
        ["g0", "g1", "embed", "head"],  # a journal without a gene table: no layer ranges known
        ["math · attn", "math · mlp"],
    )
    # embed/head genes have no part: one value fills the model's attn and mlp rows, labelled once between them.
    np.testing.assert_array_equal(weight.values, [[0.1, 0.3, 0.5, 0.6], [0.2, 0.4, 0.5, 0.6]])
    assert sorted(weight.labels) == [(0, 0, 0.1), (0, 1, 0.3), (0.5, 2, 0.5), (0.5, 3, 0.6), (1, 0, 0.2), (1, 1, 0.4)]
    assert (shared.rows, shared.values.tolist(), shared.model_starts) == (["all"], [[0.7, 0.8]], [])


def test_gene_grids_separate_models():
    params = {f"density/m{m}/g{g}": 0.1 * (m + g) for m in range(3) for g in range(2)}
    (grid,) = gene_grids(params, ["a", "b"])
    assert grid.rows == ["a", "b", "m2"] and grid.model_starts == [1, 2]
    np.testing.assert_allclose(grid.values, [[0.0, 0.1], [0.1, 0.2], [0.2, 0.3]])


# --- the files written ------------------------------------------------------------------------


def _image_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_writes_html_with_local_images_and_the_run_figures(tmp_path):
    run_dir = make_run(tmp_path)
    html_path = write_report(run_dir)
    html = html_path.read_text()
    assert html_path == run_dir / "report" / "report.html"
    assert _image_sources(html) == ["scores.png", "tasks.png", "genes.png"]
    for name in _image_sources(html):
        assert (html_path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', html), "the page must not load anything from the network"
    for label in BASELINES:
        assert label in html
    failures = re.search(r'Failures</div>\s*<div class="value">(\d+)<', html)
    assert failures and int(failures.group(1)) == 2


def test_an_interrupted_report_leaves_its_folder_as_it_was(tmp_path, monkeypatch):
    """Ctrl-C after the first PNG: no PNG without its page, no hidden staging folder; then a full report."""
    from evomerge.rundir import plots

    run_dir = make_run(tmp_path)
    draw = plots.task_bars

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "task_bars", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(run_dir)
    assert not (run_dir / "report").exists()
    assert not [p.name for p in run_dir.iterdir() if "staging" in p.name]
    monkeypatch.setattr(plots, "task_bars", draw)
    assert sorted(p.name for p in write_report(run_dir).parent.iterdir()) == [
        "genes.png",
        "report.html",
        "scores.png",
        "tasks.png",
    ]


def test_report_of_multi_objective_run_adds_pareto_front(tmp_path):
    html_path = write_report(make_run(tmp_path, objectives=True, heldout=False), tmp_path / "out")
    assert html_path == tmp_path / "out" / "report.html"
    assert "pareto.png" in _image_sources(html_path.read_text())
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


def test_report_escapes_labels(tmp_path):
    run_dir = make_run(tmp_path, trials=3, failures=(), heldout=False)
    journal = run_dir / "journal.jsonl"
    journal.write_text(journal.read_text().replace('"label": "base"', '"label": "<script>alert(1)</script>"'))
    html = write_report(run_dir).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def _set_heldout(run_dir: Path, scores: dict[int, float]) -> None:
    """Give some trials these held-out scores (every task the same), as a re-scoring would have."""
    journal = run_dir / "journal.jsonl"
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    for event in events:
        if event["event"] == "heldout" and event["trial"] in scores:
            score = scores[event["trial"]]
            event.update(score=score, metrics=dict.fromkeys(HELDOUT_TASKS, score))
    journal.write_text("".join(json.dumps(e) + "\n" for e in events))


def _headline_trial(html: str) -> int:
    match = re.search(r'class="headline" data-winner-trial="(-?\d+)"', html)
    assert match, "the page has a headline"
    return int(match.group(1))


@pytest.mark.parametrize("winner", ["evolved, not the best search score", "a baseline"])
def test_the_headline_is_the_trial_export_gives_with_its_command_and_yaml(tmp_path, winner):
    from evomerge.rundir.results import export_trial, load_trials

    run_dir = make_run(tmp_path)
    _, trials = load_trials(run_dir)
    rescored = sorted((t for t in trials.values() if t.kind == "optimizer" and t.heldout), key=lambda t: -t.score)
    chosen = rescored[-1].trial_id if winner.startswith("evolved") else -2  # the weakest re-scored, or a parent
    _set_heldout(run_dir, {chosen: 0.97})
    html = write_report(run_dir).read_text()
    exported, text = export_trial(run_dir)
    assert _headline_trial(html) == exported.trial_id == chosen
    headline = html[html.index('class="headline"') : html.index('<div class="stats">')]
    assert f"evomerge export {run_dir} -o best.yaml" in headline
    assert html_escape(text.splitlines()[1]) in headline, "the YAML export writes"
    assert "held-out score 0.9700" in headline


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_the_report_gives_run_context_se_on_every_margin_and_layer_ranges(tmp_path):
    html = write_report(make_run(tmp_path)).read_text()
    context = html[html.index("<h2>Run context</h2>") :]
    for expected in (
        "/models/base",
        "m0 = math-expert (/models/math-expert)",
        "ties, float32",
        "4 layer groups (L0-3, L4-7, L8-11, L12-15)",
        "cmaes, seed 0, popsize 6",
        "arc_easy (acc)",
        "mmlu_mini (acc)",
        "max_evals 40",
        "2 × CUDA out of memory while merging",
    ):
        assert expected in context, expected
    table = html[html.index("<h2>Baselines and evolved merges</h2>") : html.index("<h2>Run context</h2>")]
    rows = re.findall(r"<tr class=\"[^\"]*\">(.*?)</tr>", table, re.S)
    margins = [re.search(r"([+-]\d\.\d{4}) <span class=\"pm\">± (\d\.\d{3}) = (-?\d+\.\d) SE", row) for row in rows]
    assert sum(m is None for m in margins) == 1, "every row but the best baseline has a margin ± SE, in SE"
    assert "12 baselines" not in html and "4 baselines + 36 evolved candidates searched" in html


def test_the_report_says_plainly_when_nothing_beats_the_best_baseline(tmp_path):
    from evomerge.rundir.results import load_trials
    from evomerge.rundir.verdict import build_verdict

    run_dir = make_run(tmp_path)
    events, trials = load_trials(run_dir)
    _set_heldout(run_dir, {t.trial_id: 0.5 for t in trials.values() if t.heldout})
    events, trials = load_trials(run_dir)
    advice = build_verdict(run_dir, events, trials).advice
    assert advice and html_escape(advice) in write_report(run_dir).read_text()


def test_report_of_a_run_without_results_yet(tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(
        yaml.safe_dump({"name": "fresh", "merge": {"method": "dare_ties"}, "optimizer": {"name": "tpe"}})
    )
    asked = {
        "event": "asked",
        "time": 2.0,
        "trial": -1,
        "kind": "baseline",
        "label": "base",
        "x": None,
        "params": {},
        "merge_config": {},
    }
    (run_dir / "journal.jsonl").write_text(
        json.dumps({"event": "run_started", "time": 1.0, "workers": 1}) + "\n" + json.dumps(asked) + "\n"
    )
    html = write_report(run_dir).read_text()
    assert _image_sources(html) == []
    assert "in progress" in html and "No evaluation has finished yet" in html


# --- the page in a real browser ---------------------------------------------------------------


class DevTools:
    """A headless Chromium driven over the DevTools protocol on --remote-debugging-pipe."""

    def __init__(self, binary: str, profile: Path):
        to_browser, self._writer = os.pipe()
        self._reader, from_browser = os.pipe()
        # The browser reads fd 3 and writes fd 4; lift our ends above both so no dup2 clobbers another.
        child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--mute-audio",
        ]
        actions = [
            (os.POSIX_SPAWN_DUP2, child_ends[0], 3),
            (os.POSIX_SPAWN_DUP2, child_ends[1], 4),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (
                os.POSIX_SPAWN_OPEN,
                2,
                str(profile.parent / "chromium.log"),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                0o644,
            ),
        ]
        self.pid = os.posix_spawn(
            binary, [binary, *flags, "about:blank"], os.environ, file_actions=actions, setsid=True
        )
        for fd in child_ends:
            os.close(fd)
        self._ids = itertools.count(1)
        self._buffer = b""
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        message_id = next(self._ids)
        message = {
            "id": message_id,
            "method": method,
            "params": params or {},
            **({"sessionId": session} if session else {}),
        }
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        reply = self._receive(lambda m: m.get("id") == message_id, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str, session: str, timeout: float = 30.0) -> dict:
        seen = next((e for e in self.events if e["method"] == method and e.get("sessionId") == session), None)
        return seen or self._receive(
            lambda m: m.get("method") == method and m.get("sessionId") == session, timeout, method
        )

    def _receive(self, wanted, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reader], [], [], left)[0]:
                raise TimeoutError(f"no answer from Chromium to {what} within {timeout} s")
            chunk = os.read(self._reader, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe while waiting for {what}")
            self._buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout=5)
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)  # the group setsid gave the browser we started
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        os.close(self._writer)
        os.close(self._reader)


def _find_chromium() -> str | None:
    return next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = _find_chromium()
    if binary is None:
        pytest.skip(
            "no chromium on PATH; EVOMERGE_BROWSER_TESTS=1 bash scripts/setup.sh installs it to check the report in a browser"
        )
    devtools = DevTools(binary, tmp_path_factory.mktemp("chromium") / "profile")
    yield devtools
    devtools.close()


def render(browser: DevTools, html_path: Path, width: int = 1200) -> dict:
    """Load the page in a fresh tab; its console/log errors, whether every image decoded, and a screenshot."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        browser.call(f"{domain}.enable", session=session)
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    browser.call("Page.navigate", {"url": html_path.resolve().as_uri()}, session)
    browser.wait_for("Page.loadEventFired", session)
    check = (
        "({count: document.images.length, loaded: Array.from(document.images).every(i => i.complete && i.naturalWidth > 0),"
        " height: document.documentElement.scrollHeight})"
    )
    page = browser.call("Runtime.evaluate", {"expression": check, "returnByValue": True}, session)["result"]["value"]
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": page["height"], "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
    mine = [e for e in browser.events if e.get("sessionId") == session]
    errors = [
        e["params"]
        for e in mine
        if e["method"] == "Runtime.exceptionThrown"
        or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    browser.call("Target.closeTarget", {"targetId": target})
    return {**page, "errors": errors, "screenshot": base64.b64decode(shot)}


def test_report_renders_in_chromium_without_errors(browser, tmp_path):
    html_path = write_report(make_run(tmp_path, objectives=True))
    page = render(browser, html_path)
    assert page["errors"] == []
    assert page["count"] == 4 and page["loaded"]
    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(page["screenshot"])
    assert page["screenshot"][:8] == b"\x89PNG\r\n\x1a\n" and page["height"] > 900


def test_browser_check_catches_a_missing_image(browser, tmp_path):
    html_path = write_report(make_run(tmp_path, trials=6, failures=(), heldout=False))
    (html_path.parent / "genes.png").unlink()
    page = render(browser, html_path)
    assert not page["loaded"]
    assert any("ERR_FILE_NOT_FOUND" in json.dumps(error) for error in page["errors"])
