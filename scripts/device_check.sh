#!/usr/bin/env bash
# The GPU checks in one run on one GPU, at most ~8 minutes, tables written to a folder:
#   1. the fused-merge tests (tests/merge/test_fused_merge.py, compiled Triton kernels on the GPU);
#   2. bench_search.py at 1.5B: a real worker (fused merge + native scorer) per candidate, with the
#      plain-forward comparator and NVML-sampled GPU busy;
#   3. bench_eval.py at 1.5B: loglikelihood (native vs lm_eval vs plain token-budget forward) and
#      generation (native vs lm_eval generate_until vs HF generate at its best batch size);
#   4. where vLLM is installed (the project's environment, or its own in .venv-vllm): bench_eval.py
#      --backend vllm (vllm vs native vs lm_eval per candidate on the SmolLM2 zoo: scores equal to
#      native's, the per-candidate weight swap and its path (a direct write into the engine's
#      parameters where the layout allows) against vLLM's reload in place, a new engine and a disk
#      round trip), after the direct-write GPU tests (tests/evaluation/test_vllm_direct_write.py: the
#      default engine on CUDA takes the direct path, its weight map agrees with vLLM's load_weights,
#      and candidate A, then B, then A again scores A's answers both times; test_vllm_views.py: a
#      worker's reference merge writes the engine's weights through views of its blocks, no copy, and
#      the fused merger's candidates reach the engine by copy, A/B/A scoring as native both ways).
# and at real scale:
#   1. with the fused-merge tests: the tie rule and the exact-k trim (flat tie order on CUDA), the split over simulated devices (the GPU three
#      times), the shared host copy registered with CUDA (tests/merge/test_{tie_rule,placement,shared_host}.py);
#   2. bench_fused.py: sources built on the GPU (no disk): TIES and DARE-TIES at 1.5B and 3.6B
#      against the HBM bound, streamed from host memory against the pinned host-to-device bound,
#      and TIES over three fine-tunes at 7B with its peak memory (table: bench_fused.md).
#
#     bash scripts/device_check.sh [OUT_DIR]      # default: $OUT, else device_check_out/
#
# Needs the project's environment (bash scripts/setup.sh) with a CUDA build of torch, and for the
# sampled GPU busy column the optional nvidia-ml-py package. The 1.5B checkpoints (~9 GB) are built
# once into .cache/bench_merge/. Each step has its own time limit, so a slow step cannot eat the
# others' time; a step that fails or times out is recorded in summary.txt and the rest still run.
# Every limit is also cut to what is left of DEADLINE_S, so the whole script stays within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
OUT_DIR="${1:-${OUT:-device_check_out}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

DEADLINE_S=470  # 8 minutes, less setup

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, record the outcome
  local name="$1" limit="$2"
  shift 2
  local left=$((DEADLINE_S - SECONDS))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 10)); then echo "$name: skipped, the script's 8 minutes are spent" | tee -a "$SUMMARY"; return; fi
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/$name.stderr.txt"
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s (limit $limit s)" | tee -a "$SUMMARY"
}

{ nvidia-smi || echo "nvidia-smi not found"; python -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
  >"$OUT_DIR/machine.txt" 2>&1

step fused_merge_tests 150 python -m pytest -q -p no:cacheprovider tests/merge/test_fused_merge.py \
  tests/merge/test_tie_rule.py tests/merge/test_exact_k.py tests/merge/test_placement.py tests/merge/test_shared_host.py
step bench_fused 100 python scripts/bench_fused.py --device cuda --out "$OUT_DIR"
step bench_search 170 python scripts/bench_search.py --device cuda --size 1.5b --candidates 5
step bench_eval 190 python scripts/bench_eval.py --device cuda --size 1.5b --rounds 1 --prompts 128 --out "$OUT_DIR"
# vLLM is an optional extra: the step runs where it is installed (pip install 'evomerge[vllm]') and the
# SmolLM2 zoo is built (scripts/build_smol_zoo.py), and says why it did not otherwise.
VLLM_PYTHON=python
[ -x .venv-vllm/bin/python ] && VLLM_PYTHON=.venv-vllm/bin/python
if "$VLLM_PYTHON" -c 'import vllm' 2>/dev/null && [ -d .cache/smol_zoo/base ]; then
  step vllm_direct_write_test 90 "$VLLM_PYTHON" -m pytest -q -p no:cacheprovider tests/evaluation/test_vllm_direct_write.py \
    tests/evaluation/test_vllm_views.py -k "gpu or cuda"
  step bench_eval_vllm 120 "$VLLM_PYTHON" scripts/bench_eval.py --backend vllm --device cuda --docs 40 --candidates 3 \
    --out "$OUT_DIR/vllm"
else
  echo "bench_eval_vllm: skipped, vllm not installed or .cache/smol_zoo missing" | tee -a "$SUMMARY"
fi
echo "tables: $OUT_DIR/bench_fused.md, $OUT_DIR/bench_search.txt, $OUT_DIR/bench_eval.md, $OUT_DIR/vllm/; test log: $OUT_DIR/fused_merge_tests.txt" | tee -a "$SUMMARY"
