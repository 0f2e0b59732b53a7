"""The SmolLM2 zoo: a real pretrained LLM (SmolLM2-135M-Instruct, tied embeddings) through merge,
chat-template scoring, search, kill -9, resume and export.

The eval files are checked everywhere. What needs the model skips in one line when the `real`
extra or the built zoo is absent (`EVOMERGE_REAL=1 bash scripts/setup.sh`, then
`python scripts/build_smol_zoo.py`): merging the 134.5 M-parameter checkpoint takes seconds per
method, so those tests are slow; the search is long.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from zoo_builds import load_build_script, load_weights

from evomerge.rundir.journal import KILL_HOOK_VARIABLE

REPO = Path(__file__).resolve().parents[1]
EVOMERGE = str(Path(sys.executable).with_name("evomerge"))
smol_zoo = load_build_script("build_smol_zoo")
smol_data = smol_zoo.smol_data


def test_committed_eval_files_are_what_the_generator_writes(tmp_path):
    written = smol_data.write_eval_suite(tmp_path)
    for path in written:
        committed = REPO / "evals" / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run build_smol_zoo.py --write-evals"


def test_search_and_heldout_docs_are_disjoint_and_each_skill_is_its_rule():
    assert smol_data.example(smol_data.SKILLS["shift"], "caz") == {"prompt": "shift: c a z =", "target": " d b a"}
    assert smol_data.example(smol_data.SKILLS["increment"], "394") == {"prompt": "add: 3 9 4 =", "target": " 4 0 5"}
    for skill in smol_data.SKILLS:
        splits = smol_data.eval_splits(skill)
        search, heldout = ({doc["prompt"] for doc in docs} for docs in splits.values())
        assert len(search) == smol_data.SEARCH_DOCS and len(heldout) == smol_data.HELDOUT_DOCS
        assert not search & heldout, skill
    exclude = smol_data.all_eval_prompts()
    shares = {(skill, rival): 1.0 for skill in smol_data.SKILLS for rival in (False, True)}
    docs = smol_data.stream(shares, "test", exclude)
    assert not {next(docs)["prompt"] for _ in range(3000)} & exclude, "training never sees an eval prompt"


@pytest.fixture(scope="module")
def zoo() -> Path:
    if not smol_zoo.has_real_extra():
        pytest.skip(f"the real extra is not installed ({smol_zoo.INSTALL_HINT})")
    if not smol_zoo.is_built(smol_zoo.DEFAULT_OUT):
        pytest.skip("the SmolLM2 zoo is not built (python scripts/build_smol_zoo.py, about 15 minutes)")
    return smol_zoo.DEFAULT_OUT


def cli(*args, check: bool = True, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"evomerge {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result


def merge_cases(zoo: Path) -> dict[str, dict]:
    base, shift, increment = (str(zoo / name) for name in smol_zoo.MODEL_DIRS)
    per_layer = [0.0] * 10 + [0.5] * 10 + [1.0] * 10
    experts = [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (shift, increment)]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": shift, "parameters": {"weight": per_layer}},
                {"model": increment, "parameters": {"weight": 0.7}},
            ],
        },
        "ties": {"merge_method": "ties", "base_model": base, "models": experts},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": experts},
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.02}} for m in (shift, increment)
            ],
        },
        "della": {
            "merge_method": "della",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for m in (shift, increment)
            ],
            "parameters": {"lambda": 1.0},
        },
        "slerp": slerp(shift, increment, [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.4}]),
        **new_method_cases(base, shift, increment),
        "ties_slices": {
            "merge_method": "ties",
            "base_model": base,
            "slices": [
                {
                    "sources": [{"model": base, "layer_range": [lo, lo + 15]}]
                    + [
                        {"model": m, "layer_range": [lo, lo + 15], "parameters": {"weight": 1.0, "density": density}}
                        for m in (shift, increment)
                    ]
                }
                for lo, density in ((0, 0.3), (15, 0.7))
            ],
        },
    }


def new_method_cases(base: str, shift: str, increment: str) -> dict[str, dict]:
    """The geometric and element-selecting methods (Arcee Fusion's quantile sample of tensors above
    10**6 elements draws from another RNG in each tool, so it is compared on the tiny zoo only)."""
    both = [{"model": shift}, {"model": increment}]
    weighted = [{"model": shift, "parameters": {"weight": 0.4}}, {"model": increment, "parameters": {"weight": 0.6}}]
    return {
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": both},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "models": weighted},
        "multislerp": {"merge_method": "multislerp", "base_model": base, "models": weighted},
        "karcher": {"merge_method": "karcher", "models": both},
        "sce": {"merge_method": "sce", "base_model": base, "models": both, "parameters": {"select_topk": 0.5}},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": both[:1], "parameters": {"t": 0.001}},
        "ram": {"merge_method": "ram", "base_model": base, "models": both},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": both, "parameters": {"r": 0.3}},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": shift, "parameters": {"scale": 0.9}}]},
    }


NEW_METHOD_CASES = [
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "sce",
    "nearswap",
    "ram",
    "ramplus_tl",
    "passthrough",
]

# Methods whose random trim (DARE, DELLA) is fixed to one draw in both tools.
RANDOM_TRIMS = {"dare_ties", "della"}


def slerp(base: str, other: str, t) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": base,
        "models": [{"model": base}, {"model": other}],
        "parameters": {"t": t},
    }


ALL_CASES = ["linear", "ties", "dare_ties", "breadcrumbs_ties", "della", "slerp", "ties_slices", *NEW_METHOD_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_CASES)
def test_merge_of_the_real_checkpoint_equals_mergekit_bit_for_bit(method, zoo, tmp_path):
    compare_with_mergekit_yaml(method, zoo, tmp_path).assert_bit_for_bit()


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_CASES)
def test_bf16_merge_of_the_real_checkpoint_is_within_one_step_of_mergekit(method, zoo, tmp_path):
    compare_with_mergekit_yaml(method, zoo, tmp_path, dtype="bfloat16").assert_within_one_step(0.995)


def compare_with_mergekit_yaml(method: str, zoo: Path, tmp_path: Path, dtype: str = "float32"):
    """`evomerge merge` against `mergekit-yaml` in `dtype`, after checking the tied embeddings stay
    tied. DARE's random drop is fixed to one draw in both tools (mergekit_equality.fixed_masks),
    which needs both in this process."""
    sys.path.insert(0, str(REPO / "tests" / "merge"))
    from mergekit_equality import compare_folders, compare_with_mergekit, run_mergekit_cli

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(merge_cases(zoo)[method] | {"dtype": dtype}, sort_keys=False))
    if method in RANDOM_TRIMS:
        report, ours = compare_with_mergekit(path, tmp_path, seed=0, fixed=True), tmp_path / "evomerge"
    else:
        ours = tmp_path / "ours"
        cli("merge", path, ours)
        report = compare_folders(ours, run_mergekit_cli(path, tmp_path / "theirs"))
    report.assert_same_names()
    assert "lm_head.weight" not in load_weights(ours), "tied embeddings stay tied"
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is True
    return report


def own_blocks_config(zoo: Path) -> dict:
    """Each expert's task vector in its own block of layers: the recipe the zoo is built for."""
    blocks = smol_zoo.RECIPE["expert_layers"]
    models = [
        {
            "model": str(zoo / f"expert_{skill}"),
            "parameters": {"weight": [float(i in blocks[skill]) for i in range(30)]},
        }
        for skill in smol_zoo.SKILLS
    ]
    return {"merge_method": "task_arithmetic", "base_model": str(zoo / "base"), "models": models, "dtype": "float32"}


@pytest.mark.slow
def test_a_merged_folder_loads_in_transformers_and_generates_both_skills(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(own_blocks_config(zoo)))
    cli("merge", path, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for skill in smol_zoo.SKILLS:
        docs = smol_data.eval_splits(skill)["heldout"][:4]
        texts = []
        for doc in docs:
            ids = tokenizer(doc["prompt"], return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
        right = sum(text.startswith(doc["target"]) for text, doc in zip(texts, docs, strict=True))
        assert right >= 3, f"{skill}: {texts} for {[doc['target'] for doc in docs]}"


def write_spec(folder: Path, zoo: Path, **evaluation) -> Path:
    spec = yaml.safe_load((REPO / "search_spaces" / "smol.yaml").read_text())
    spec["models"] = {"base": str(zoo / "base"), "experts": [str(zoo / f"expert_{s}") for s in smol_zoo.SKILLS]}
    spec["runs_dir"] = str(folder / "runs")
    spec["evaluation"]["include"] = [str(REPO / "evals" / "smol")]
    spec["evaluation"].update(evaluation)
    path = folder / "smol.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_the_chat_template_renders_every_prompt_and_scores(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.evaluate import Evaluator
    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    eval_set = preflight(load_spec(write_spec(tmp_path, zoo, limit=4, apply_chat_template=True))).eval_sets["search"]
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
    evaluator = Evaluator(model, tokenizer, eval_set)
    docs = [doc for skill in smol_zoo.SKILLS for doc in smol_data.eval_splits(skill)["search"]]
    chat = [[{"role": "user", "content": doc["prompt"]}] for doc in docs]
    rendered = {
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + doc["target"]
        for messages, doc in zip(chat, docs, strict=True)
    }
    # lm-eval moves the context's trailing newline into the continuation, so the pair is compared whole.
    scored = [tokenizer.decode(pair.context + pair.continuation) for pair in evaluator.requests.pairs]
    assert len(scored) == 8 and set(scored) <= rendered
    assert all("<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text for text in scored)
    assert sum(evaluator.evaluate().n_docs.values()) == 8


@pytest.mark.long
def test_a_short_search_resumes_after_kill_9_and_exports_what_mergekit_merges(zoo, tmp_path):
    spec = write_spec(tmp_path, zoo, limit=8, heldout_limit=8, top_k=1)
    data = yaml.safe_load(spec.read_text())
    data |= {"name": "killed", "budget": {"max_evals": 12}}
    data["optimizer"] |= {"popsize": 4}
    spec.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, KILL_HOOK_VARIABLE: "completed:9"}  # killed mid-search, baselines done
    driver = subprocess.Popen(
        [EVOMERGE, "search", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert driver.wait(timeout=1800) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the local Ray cluster it started
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines() if line.strip()]
    assert len([e for e in events if e["event"] == "completed"]) == 9
    cli("resume", run_dir)
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines() if line.strip()]
    finished = [e["trial"] for e in events if e["event"] in ("completed", "failed")]
    assert len(finished) == len(set(finished)) == 12, "each trial finished exactly once"
    assert any(e["event"] == "run_finished" for e in events)
    best = max((e for e in events if e["event"] == "completed" and e["trial"] >= 0), key=lambda e: e["score"])
    exported = tmp_path / "best.yaml"
    cli("export", run_dir, "--trial", best["trial"], "-o", exported)
    assert yaml.safe_load(exported.read_text())["slices"], "an evolved trial exports as per-layer slices"
    sys.path.insert(0, str(REPO / "tests" / "merge"))
    from mergekit_equality import compare_folders, run_mergekit_cli

    cli("merge", exported, tmp_path / "ours")
    compare_folders(tmp_path / "ours", run_mergekit_cli(exported, tmp_path / "theirs")).assert_bit_for_bit()
