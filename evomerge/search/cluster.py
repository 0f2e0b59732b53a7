"""Connecting to Ray and creating worker actors: local cluster by default, or an existing one.

A local cluster is always a fresh one (never a `ray start` cluster that happens to run on the
machine) and listens on 127.0.0.1 only, with the dashboard off. Without GPUs the search runs N CPU
workers, each with its own torch threads.
"""

from __future__ import annotations

import os

from evomerge.errors import UserError
from evomerge.preflight import Prepared
from evomerge.search.worker import WorkerSettings, ray_worker_class
from evomerge.spec import Spec


def connect(spec: Spec, address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {
        "env_vars": {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
    }
    try:
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, int(_worker_count(spec, gpus=_local_gpus()) * spec.workers.cpus_per_worker))
            _start_loopback_cluster(num_cpus=cpus, runtime_env=env)
    except ConnectionError as error:
        raise UserError(
            f"--address: cannot reach a Ray cluster at {address} ({error}); start one with 'ray start --head' or drop --address"
        ) from None


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
        base_model=spec.models.base,
        union_config=prepared.union_config,
        eval_sets=prepared.eval_sets,
        device=device,
        dtype=spec.merge.dtype,
        cpu_threads=max(1, int(spec.workers.cpus_per_worker)),
        trust_remote_code=spec.trust_remote_code,
        merge_seed=spec.optimizer.seed,
        merge_method=spec.merge.method,
    )
    actor_class = ray_worker_class(
        spec.workers.cpus_per_worker, spec.workers.gpus_per_worker if device == "cuda" else 0
    )

    def make_actor(index: int):
        return actor_class.remote(settings, f"w{index}")

    return make_actor, count
