"""Host placement keeps one copy of the sources per node, whatever the number of workers.

Two worker processes load the same host-placed sources: one fills a shared-memory file, the other
maps it, and neither holds a private copy (their anonymous memory does not grow by one); a third
process without sharing grows by one copy more than they do. Merging from
the shared copy gives the reference path's tensors, and the last user removes the file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from shared_host_worker import load_in_worker, union
from tiny_models import build_tokenizer, save_checkpoint, tiny_llama_config

from evomerge.merge.fused.shared_host import SHARED_DIR_ENV

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def mid_zoo(tmp_path_factory):
    """A base and two fine-tunes of ~3.4M parameters: a 41 MB host copy, far above allocator noise."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("mid_zoo")
    config = tiny_llama_config(vocab_size=4096, hidden_size=256)
    config.intermediate_size, config.num_hidden_layers = 512, 2
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    tokenizer = build_tokenizer(4096)
    save_checkpoint(base, tokenizer, root / "base", torch.float32)
    for index in range(2):
        with torch.no_grad():
            for parameter in base.parameters():
                parameter.add_(0.01 * (index + 1) * torch.randn_like(parameter))
        save_checkpoint(base, tokenizer, root / f"ft{index}", torch.float32)
    return str(root / "base"), [str(root / "ft0"), str(root / "ft1")]


@pytest.fixture
def shared_dir():
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = Path(tempfile.mkdtemp(prefix="evomerge-test-", dir=parent))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_a_node_hold_one_host_copy(mid_zoo, shared_dir, monkeypatch):
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("needs Linux's /proc/self/smaps_rollup")
    base, experts = mid_zoo
    monkeypatch.setenv(SHARED_DIR_ENV, str(shared_dir))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS at once
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [
        context.Process(target=load_in_worker, args=(base, experts, shared, barrier, results))
        for shared in (True, True, False)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    print(json.dumps(reports))  # the figures docs/BENCHMARKS.md quotes (pytest -s)
    sharing = [r for r in reports if r["shared"]]
    private = next(r for r in reports if not r["shared"])
    copy_bytes = private["copy_bytes"]
    assert copy_bytes > 30e6
    assert sorted(r["created"] for r in sharing) == [False, True], "one worker fills, the other maps"
    assert sharing[0]["inode"] == sharing[1]["inode"]
    # Everything but the copy (lazy library state, freed temporaries) grows alike in all three.
    saved = [private["grown"] - r["grown"] for r in sharing]
    assert all(0.8 * copy_bytes < s < 1.2 * copy_bytes for s in saved), (saved, copy_bytes)
    assert sharing[0]["checksum"] == sharing[1]["checksum"] == private["checksum"]
    assert not list(shared_dir.glob("*.data")), "the last worker to close removes the copy"


def test_merging_from_the_shared_copy_equals_the_reference(zoo, shared_dir, monkeypatch):
    from test_fused_merge import DEVICE, assert_same_weights, gradient_candidate, merged_by_reference
    from transformers import AutoModelForCausalLM

    from evomerge.merge.fused.candidate import CandidateMerger
    from evomerge.merge.fused.sources import FusedSources

    monkeypatch.setenv(SHARED_DIR_ENV, str(shared_dir))
    base, experts = zoo.model("base", "bf16"), [zoo.model(n, "bf16") for n in ("ft_a", "ft_b", "ft_c")]
    config = union(base, experts, "bfloat16")
    first = FusedSources.load(config, "ties", DEVICE, "host", chunk_bytes=60_000, shared=True)
    second = FusedSources.load(config, "ties", DEVICE, "host", chunk_bytes=60_000, shared=True)
    assert first.shared.created and not second.shared.created
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(DEVICE)
    merger = CandidateMerger.adopting(model, second)
    candidate = gradient_candidate(base, experts, "ties", "bfloat16")
    merger.merge(candidate)
    assert merger.path == "fused" and merger.verified
    assert_same_weights(merger, merged_by_reference(base, config, candidate, torch.bfloat16))
    first.close()
    assert list(shared_dir.glob("*.data")), "still mapped by the second"
    second.close()
    assert not list(shared_dir.glob("*.data"))
