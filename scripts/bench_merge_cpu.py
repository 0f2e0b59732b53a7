"""CPU benchmark: whole-process `evomerge merge` vs `mergekit-yaml` on the same merges.

Builds (once, cached in .cache/bench/) a ~75M-parameter fp32 Llama base and two fine-tunes, then
times both command lines on a TIES and a linear YAML, alternating tools, under `/usr/bin/time -v`
for wall time and peak RSS. Prints a markdown table and rewrites the "CPU: evomerge merge vs
mergekit-yaml" section of docs/BENCHMARKS.md.

    python scripts/bench_merge_cpu.py [--repeats 3] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
BENCHMARKS_MD = REPO / "docs" / "BENCHMARKS.md"
SECTION_TITLE = "## CPU: evomerge merge vs mergekit-yaml"
MODEL_SHAPE = dict(
    vocab_size=16000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
FINETUNE_SCALES = {"ft_a": 0.004, "ft_b": 0.01}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # user + system: less sensitive than wall time to other load on the machine
    peak_rss_gib: float


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer with exactly `vocab_size` entries; mergekit refuses models without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_checkpoints(root: Path) -> dict[str, Path]:
    """Base + fine-tunes (base plus seeded noise), rebuilt only when the shape spec changes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {name: root / name for name in ("base", *FINETUNE_SCALES)}
    stamp = root / "spec.json"
    spec = json.dumps({"shape": MODEL_SHAPE, "scales": FINETUNE_SCALES}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == spec and all((p / "config.json").exists() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = build_tokenizer(MODEL_SHAPE["vocab_size"])
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**MODEL_SHAPE)).eval()
    base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    for seed, name in enumerate(paths, start=1):
        generator = torch.Generator().manual_seed(seed)
        scale = FINETUNE_SCALES.get(name, 0.0)
        with torch.no_grad():
            for key, tensor in base.state_dict().items():
                tensor.copy_(base_state[key] + scale * torch.randn(tensor.shape, generator=generator))
        base.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    stamp.write_text(spec)
    return paths


def write_configs(root: Path, models: dict[str, Path]) -> dict[str, Path]:
    """The two merges timed: TIES (sparsify + sign election) and plain linear averaging."""
    fine_tunes = [
        {"model": str(models[name]), "parameters": {"weight": 0.5, "density": 0.5}} for name in FINETUNE_SCALES
    ]
    configs = {
        "ties": {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32", "models": fine_tunes},
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [{"model": str(models[name]), "parameters": {"weight": 1.0}} for name in models],
        },
    }
    paths = {}
    for name, config in configs.items():
        paths[name] = root / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def tool_command(tool: str, config: Path, out_dir: Path) -> list[str]:
    if tool == "evomerge":
        return [str(BIN / "evomerge"), "merge", str(config), str(out_dir), "--device", "cpu"]
    return [str(BIN / "mergekit-yaml"), "--no-write-model-card", str(config), str(out_dir)]


def timed_run(command: list[str]) -> Timing:
    """Run under /usr/bin/time -v: wall clock from here, peak RSS from its report."""
    started = time.perf_counter()
    finished = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=bench_env())
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")

    def reported(label: str) -> float:
        return float(re.search(rf"{re.escape(label)}: ([\d.]+)", finished.stderr).group(1))

    cpu = reported("User time (seconds)") + reported("System time (seconds)")
    return Timing(wall, cpu, reported("Maximum resident set size (kbytes)") / 1024**2)


def bench_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def max_relative_difference(ours: Path, theirs: Path) -> float:
    """max |a-b| / max |b| over all tensors: proves both tools produced the same merge."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict[str, torch.Tensor]:
        tensors = {}
        for shard in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(shard))
        return tensors

    a, b = load(ours), load(theirs)
    assert sorted(a) == sorted(b), "the two tools wrote different tensor names"
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), 1e-30) for n in b)


def bench_method(config: Path, repeats: int, scratch: Path) -> dict:
    """Alternate the tools `repeats` times so drift in machine load hits both alike."""
    timings: dict[str, list[Timing]] = {"evomerge": [], "mergekit": []}
    for _ in range(repeats):
        for tool in timings:
            out_dir = scratch / tool
            shutil.rmtree(out_dir, ignore_errors=True)
            timings[tool].append(timed_run(tool_command(tool, config, out_dir)))
    return {
        "difference": max_relative_difference(scratch / "evomerge", scratch / "mergekit"),
        **{
            tool: Timing(
                statistics.median(t.wall_s for t in runs),
                statistics.median(t.cpu_s for t in runs),
                max(t.peak_rss_gib for t in runs),
            )
            for tool, runs in timings.items()
        },
    }


def markdown_table(results: dict[str, dict]) -> str:
    rows = [
        "| merge | evomerge wall (s) | mergekit wall (s) | speed-up (wall) | evomerge CPU (s) | mergekit CPU (s) "
        "| speed-up (CPU) | evomerge peak RSS (GiB) | mergekit peak RSS (GiB) | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        ours, theirs = r["evomerge"], r["mergekit"]
        rows.append(
            f"| {method} | {ours.wall_s:.2f} | {theirs.wall_s:.2f} | {theirs.wall_s / ours.wall_s:.2f}x "
            f"| {ours.cpu_s:.2f} | {theirs.cpu_s:.2f} | {theirs.cpu_s / ours.cpu_s:.2f}x "
            f"| {ours.peak_rss_gib:.2f} | {theirs.peak_rss_gib:.2f} | {r['difference']:.1e} |"
        )
    return "\n".join(rows)


def machine_description() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    from importlib.metadata import version

    return (
        f"{cpu.group(1) if cpu else platform.processor()}, nproc={os.cpu_count()}, {memory:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, mergekit {version('mergekit')}"
    )


def parameter_count() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**MODEL_SHAPE)).parameters())


def report(results: dict[str, dict], repeats: int, load: tuple[float, float]) -> str:
    millions = parameter_count() / 1e6
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            f"Whole-process wall time (median of {repeats}, tools alternated) and peak RSS (max over runs,",
            "`/usr/bin/time -v`) for the same YAML. Inputs: a Llama-shaped fp32 base and two fine-tunes,",
            f"{millions:.0f}M parameters each ({MODEL_SHAPE['num_hidden_layers']} layers, hidden "
            f"{MODEL_SHAPE['hidden_size']}, vocab {MODEL_SHAPE['vocab_size']}); TIES at density 0.5 over the two",
            "fine-tunes, linear over all three. Speed-up = mergekit / evomerge; CPU = user + system seconds.",
            "Both include ~3-4 s of imports.",
            "",
            f"Command: `python scripts/bench_merge_cpu.py --repeats {repeats}`",
            "",
            f"Machine: {machine_description()}; run {time.strftime('%Y-%m-%d')}; 1-minute load average "
            f"{load[0]:.1f} before and {load[1]:.1f} after (other work on the machine inflates wall time most).",
            "",
            markdown_table(results),
            "",
        ]
    )


def update_benchmarks_md(section: str) -> None:
    """Replace this section (up to the next '## ' heading) or append it."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS_MD.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="print the table only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    os.environ.update(bench_env())
    CACHE.mkdir(parents=True, exist_ok=True)
    models = build_checkpoints(CACHE / "models")
    configs = write_configs(CACHE, models)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        results = {method: bench_method(path, args.repeats, Path(scratch)) for method, path in configs.items()}
    section = report(results, args.repeats, (load_before, os.getloadavg()[0]))
    print(section)
    if not args.no_docs:
        update_benchmarks_md(section)


if __name__ == "__main__":
    main()
