"""`search.space: params_then_layers`: a parameter search, then a layer search over its winner, in one run.

Phase 1 is the ordinary parameter-space search (baselines included) until it has asked
`params_share` of `budget.max_evals` (of the frozen spec: `resume --max-evals` extends phase 2
only). Once every phase-1 candidate has its result, the winner by SEARCH score (held-out scores
never choose it) is journaled in one `phase_changed` event (its trial, label, score and
merge config; the first phase-2 trial id; phase 2's seeds) and phase 2 is a layer search whose
sources are the base, the experts and that winner, named `ps_winner` in its merge configs.

The driver materializes the winner once, into `RUN/ps_winner/`, with the merge code `evomerge
merge` uses (`merge_to_disk` writes beside the target and renames it into place, so the folder is
whole or absent). Phase-2 workers then load it as one more local source, exactly as a layer
search loads an expert: no worker-side merge code, one merge per run instead of one per worker,
and the export's intermediate model is the very folder the candidates were built from. The
folder is derived from the journal (the winner's config and the run's merge seed), so a resume
that finds it missing rebuilds it; the first phase's optimizer is done with, and the layer phase
gets a new one whose trial ids go on from the first phase's and which replays only the events
after the change (`replay.restore_optimizer(start=...)`).

Held-out re-scoring runs once per phase, on that phase's workers (layer workers cannot build a
parameter merge): the baselines and phase 1's top-k before the change, phase 2's top-k at the
end. Export and the report pick the held-out winner over both.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from evomerge.errors import UserError
from evomerge.hub import ModelSource, ModelSources
from evomerge.layer_genome import LayerGenome
from evomerge.merge.config import MergeConfig, rename_models
from evomerge.merge.io import inspect_model_folder
from evomerge.merge.registry import every_tensor_config
from evomerge.preflight import Prepared
from evomerge.rundir.events import EventName
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import Ledger
from evomerge.rundir.trials import Tally, Trial
from evomerge.search.selection import heldout_candidates
from evomerge.search_space import PHASES, PS_WINNER
from evomerge.spec import Spec

PARAMS, LAYERS = PHASES


class Phases:
    """Where a run stands between its phases, and what the loop needs at the change; inert in a run of one space."""

    def __init__(self, prepared: Prepared, run: RunDir, ledger: Ledger):
        spec = prepared.spec
        self.active = spec.search.phased
        self.params_prepared, self.run = prepared, run
        frozen_evals = (ledger.frozen_spec.get("budget") or {}).get("max_evals", spec.budget.max_evals)
        self.params_evals = spec.search.params_evals(frozen_evals) if self.active else 0
        self.layer_prepared = layer_prepared(prepared, run) if self.active else None
        # Held here and set by `changed`: the loop asks it before every candidate, and the ledger would scan the journal.
        change = ledger.phase_change
        self.change_at, self.change = change if change is not None else (None, None)

    @property
    def current(self) -> str | None:
        if not self.active:
            return None
        return PARAMS if self.change is None else LAYERS

    @property
    def seeds(self) -> list[tuple[str, np.ndarray]]:
        """The layer phase's seeds (the winner alone), as the change journaled them."""
        return journaled_seeds(self.change) if self.change is not None else []

    def label_notes(self) -> list[str]:
        """What a candidate's label says of its phase ('params' or 'layers'); nothing in a one-space run."""
        return [self.current] if self.current else []

    def params_spent(self, tally: Tally) -> bool:
        """Phase 1 has asked its share: no more parameter candidates."""
        return self.current == PARAMS and tally.asked >= self.params_evals

    def change_fields(self, trials: dict[int, Trial], optimizer) -> dict:
        """The `phase_changed` event's fields, from phase 1's results."""
        assert self.layer_prepared is not None
        return change_fields(winner_of(trials), optimizer.next_trial_id, winner_seeds(self.layer_prepared.genome))

    def changed(self, event: dict, position: int) -> None:
        self.change_at, self.change = position, event

    def layer_optimizer(self, new_optimizer):
        """What makes the layer phase's optimizer (fresh: ids on from phase 1's, the winner enqueued)."""
        return lambda: layer_optimizer(new_optimizer, self.change)

    def announcement(self) -> str:
        change = self.change or {}
        return f"parameter phase done: its winner, {change.get('label')} (search score {change.get('score'):.4f}), joins the layer phase's sources as {PS_WINNER}"

    def materialize_winner(self) -> None:
        """In the layer phase, make sure RUN/ps_winner/ holds the winner (a resume may find it missing)."""
        if self.current == LAYERS:
            materialize_winner(self.params_prepared, self.run, self.change)

    def trials_of_current(self, trials: dict[int, Trial]) -> dict[int, Trial]:
        """The trials the current phase's held-out pass picks from: all of them but in a layer phase."""
        return self._split(trials)[1] if self.current == LAYERS else trials

    def earlier_ties(self, trials: dict[int, Trial], top_k: int) -> dict | None:
        """The parameter phase's tie report at its held-out cut, for a layer phase with no tie of its own."""
        return heldout_candidates(self._split(trials)[0], top_k)[1] if self.current == LAYERS else None

    def _split(self, trials: dict[int, Trial]) -> tuple[dict[int, Trial], dict[int, Trial]]:
        """(the parameter phase's trials, the layer phase's), at the journaled change."""
        first = self.change["first_trial"]  # type: ignore[index]  # only asked in the layer phase
        return {i: t for i, t in trials.items() if i < first}, {i: t for i, t in trials.items() if i >= first}


def winner_of(trials: dict[int, Trial]) -> Trial:
    """Phase 1's best completed trial by search score (the first of equals, in the order asked)."""
    done = [t for t in trials.values() if t.status == EventName.COMPLETED and t.score is not None]
    if not done:
        raise UserError(
            "the parameter phase has no completed candidate to carry into the layer phase; see 'evomerge status'"
        )
    return max(done, key=lambda t: t.score)


def winner_folder(run: RunDir) -> Path:
    return run.root / PS_WINNER


def layer_spec(spec: Spec) -> Spec:
    """Phase 2's spec: a layer search whose last expert is the params winner."""
    models = spec.models.model_copy(update={"experts": [*spec.models.experts, PS_WINNER]})
    return spec.model_copy(update={"search": spec.search.layer_space(), "models": models})


def layer_prepared(prepared: Prepared, run: RunDir) -> Prepared:
    """What the layer phase searches with: its genome, every source resident, `ps_winner` a local folder."""
    spec = layer_spec(prepared.spec)
    base = prepared.sources.folder(spec.models.base)
    num_layers = inspect_model_folder(base, "models.base").num_layers
    folder = str(winner_folder(run))
    sources = ModelSources({**dict(prepared.sources), PS_WINNER: ModelSource(PS_WINNER, folder)})
    union = every_tensor_config(spec.models.base, spec.models.experts, spec.merge.dtype)
    union = MergeConfig.model_validate(union).model_dump(mode="json", exclude_none=True)
    genome = LayerGenome(spec, num_layers)
    return replace(prepared, spec=spec, genome=genome, union_config=union, baselines=[], sources=sources)


def winner_seeds(genome: LayerGenome) -> list[tuple[str, np.ndarray]]:
    """The layer phase's seed: the params winner alone, as a layer path."""
    return [(PS_WINNER, genome.path_point(genome.model_alone(len(genome.models) - 1)))]


def change_fields(winner: Trial, first_trial: int, seeds: list[tuple[str, np.ndarray]]) -> dict:
    """The `phase_changed` event's fields: enough to rebuild phase 2 from the journal alone."""
    return {
        "name": PS_WINNER,
        "winner": winner.trial_id,
        "label": winner.label,
        "score": winner.score,
        "merge_config": winner.merge_config,
        "first_trial": first_trial,
        "seeds": [{"label": label, "x": [float(v) for v in x]} for label, x in seeds],
    }


def journaled_seeds(change: dict) -> list[tuple[str, np.ndarray]]:
    return [(s["label"], np.asarray(s["x"], dtype=float)) for s in change["seeds"]]


def layer_optimizer(new_optimizer, change: dict):
    """A fresh layer-phase optimizer: trial ids go on from phase 1's, the winner's path enqueued first."""
    optimizer = new_optimizer()
    optimizer.start_trial_ids_at(change["first_trial"])
    for _, x in journaled_seeds(change):
        optimizer.enqueue(x)
    return optimizer


def materialize_winner(prepared: Prepared, run: RunDir, change: dict) -> Path:
    """RUN/ps_winner/: the params winner's merge, written once (whole or not at all); kept when there."""
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.multi_disk import is_complete_merge

    folder = winner_folder(run)
    if is_complete_merge(folder):
        return folder
    spec = prepared.spec
    config = MergeConfig.model_validate(rename_models(change["merge_config"], prepared.sources.folders()))
    merge_to_disk(config, folder, device="cpu", seed=spec.optimizer.seed, progress=False, force=folder.exists())
    return folder
