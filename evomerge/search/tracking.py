"""Optional experiment logging to TensorBoard or Weights & Biases: off unless the spec asks.

Neither package is a dependency. Asking for one that is not installed is a spec error found
before the search starts. Logging never decides anything: the journal stays the source of truth.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.rundir.layout import RunDir


class Tracker:
    """Sends each finished trial to every requested backend."""

    def __init__(self, spec, run_dir: Path):
        self.backends = []
        if spec.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.backends.append(_TensorBoard(SummaryWriter(log_dir=str(RunDir.of(run_dir).tensorboard))))
        if spec.logging.wandb:
            import wandb

            self.backends.append(
                _Wandb(
                    wandb.init(
                        project=spec.logging.wandb_project,
                        name=spec.name,
                        dir=str(run_dir),
                        config=spec.model_dump(mode="json"),
                    )
                )
            )
        self.step = 0

    def log_trial(self, trial, best: float | None) -> None:
        self.step += 1
        values = {"score": trial.score, "best_so_far": best}
        values.update({f"task/{name}": value for name, value in (trial.result.metrics or {}).items()})
        values = {k: v for k, v in values.items() if v is not None}
        for backend in self.backends:
            backend.log(values, self.step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run):
        self.run = run

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
