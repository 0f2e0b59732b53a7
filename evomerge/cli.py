"""The `evomerge` command line: a thin layer over the library, one function per command.

User errors print one line and exit 2 (a traceback only with --debug); everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from evomerge.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(help="Evolutionary search for LLM merge recipes, exported as mergekit YAML.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
DebugOption = typer.Option(False, "--debug", help="Show full tracebacks.")


@app.callback()
def _commands() -> None:
    """Evolutionary search for LLM merge recipes, exported as mergekit YAML."""


def user_errors_exit_2(command):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            if kwargs.get("debug"):
                raise
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@app.command()
@user_errors_exit_2
def merge(
    config: Path = typer.Argument(..., help="A mergekit merge YAML."),
    out_dir: Path = typer.Argument(..., help="Folder to write the merged model into."),
    device: str = typer.Option("cpu", help="cpu or cuda: where the merge math runs."),
    seed: int = typer.Option(0, help="Seed for random methods (dare_*, della*)."),
    shard_size_gb: float = typer.Option(2.0, help="Largest safetensors shard, in GB."),
    debug: bool = DebugOption,
):
    """Materialize a mergekit YAML as a model folder (same tensors as mergekit-yaml)."""
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import merge_to_disk

    if device.startswith("cuda"):
        _require_cuda()
    merge_config = load_merge_config(config)
    validated = merge_to_disk(merge_config, out_dir, device=device, seed=seed, progress=sys.stderr.isatty(), max_shard_bytes=int(shard_size_gb * 1024**3))
    typer.echo(f"wrote {len(validated.plan.tensors)} tensors ({validated.plan.num_layers} layers) to {out_dir}")


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device: CUDA is not available on this machine; use --device cpu")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
