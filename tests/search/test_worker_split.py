"""A worker split over k devices (workers.gpus_per_worker: k), with "cpu" standing in for each GPU.

The worker dispatches its model by layers (accelerate hooks carry activations across), keeps each
tensor's sources on its layer's device, and scores a candidate exactly as a one-device worker does.
"""

from __future__ import annotations

import pytest
from test_worker import candidate, make_worker, prepared  # noqa: F401 - prepared is a fixture

from evomerge.search.cluster import _worker_devices
from evomerge.spec import Spec


def test_a_worker_split_over_simulated_devices_scores_like_one_device(prepared):  # noqa: F811
    from evomerge.search.worker import MergeWorker, WorkerSettings

    settings = WorkerSettings(
        base_model=prepared.spec.models.base,
        union_config=prepared.union_config,
        eval_sets=prepared.eval_sets,
        devices=("cpu", "cpu"),
    )
    split = MergeWorker(settings, "split")
    assert any(hasattr(module, "_hf_hook") for module in split.model.modules()), "dispatched by layers"
    one = make_worker(prepared, "one")
    for unit_value in (0.3, 0.8):
        config = candidate(prepared, unit_value)
        expected, got = one.evaluate(0, config), split.evaluate(0, config)
        assert expected.ok and got.ok, (expected, got)
        assert got.score == expected.score and got.metrics == expected.metrics


@pytest.mark.parametrize(
    ("per_worker", "device", "expected"), [(4, "cuda", 4), (1, "cuda", 0), (0.5, "cuda", 0), (4, "cpu", 0)]
)
def test_ray_workers_see_their_k_gpus_as_cuda_0_to_k_minus_1(per_worker, device, expected):
    spec = Spec.model_validate(
        {
            "name": "k",
            "models": {"base": "b", "experts": ["e"]},
            "evaluation": {"tasks": ["t"]},
            "workers": {"gpus_per_worker": per_worker},
        }
    )
    assert _worker_devices(spec, device) == tuple(f"cuda:{i}" for i in range(expected))
