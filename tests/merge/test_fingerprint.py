"""The identical-model check: sampled fingerprints find copies fast, a full read confirms them.

A fine-tune that changed only bytes between the sampled windows must not be taken for a copy.
"""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from evomerge.merge.fingerprint import same_weights, weights_fingerprint


def model_folder(folder, tensors):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_a_copy_matches_and_a_change_between_the_sampled_windows_is_caught_by_the_full_read(tmp_path):
    tensors = {"embed.weight": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)}
    base = model_folder(tmp_path / "base", tensors)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert weights_fingerprint(base) == weights_fingerprint(copy) and same_weights(base, copy)

    # One new token row in the middle of the embedding: far from every sampled 64-byte window.
    changed = {"embed.weight": tensors["embed.weight"].clone()}
    changed["embed.weight"][36, 5] += 1.0
    fine_tune = model_folder(tmp_path / "fine_tune", changed)
    assert weights_fingerprint(fine_tune) == weights_fingerprint(base), "premise: the windows miss the change"
    assert not same_weights(base, fine_tune)
