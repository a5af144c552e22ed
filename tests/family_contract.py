"""The contract every generator family keeps, as one function a new family's test calls.

``check_family(kind, root)`` trains a tiny ``kind`` generator (its sizes come from ``helpers.TINY[kind]``),
samples it and checks: the samples are valid, their seeds decide them (not how a request is split), the
checkpoint round-trips exactly, an interrupted run resumes to the same weights, and a sampled version's
lineage names the model. Each check is also a function of its own, for tests that want one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_hopper, tiny_generator

from rlsynth.datasets.validation import validate_transitions
from rlsynth.generators.api import LoadedGenerator, SampleOptions, generator_lineage, load_generator, sample
from rlsynth.generators.checkpoint import read_tensors


def contract_options(kind: str, seed: int) -> SampleOptions:
    """Options every family samples with; world-model rollouts need a horizon."""
    return SampleOptions(seed=seed, horizon=6 if kind == "world-model" else None)


def check_samples_are_valid(gen: LoadedGenerator) -> None:
    ds = sample(gen, random_hopper(), 123, contract_options(gen.kind, 0))
    t = ds.transitions
    assert len(t) == 123 and t.observations.shape == (123, 11) and t.actions.shape == (123, 3)
    assert np.isfinite(t.observations).all() and np.isfinite(t.rewards).all()
    validate_transitions(t, ds.info, gen.kind)
    assert (np.abs(t.actions) <= 1.0).all()


def check_seeds_decide_samples(gen: LoadedGenerator) -> None:
    a = sample(gen, random_hopper(), 60, contract_options(gen.kind, 1)).transitions
    b = sample(gen, random_hopper(), 60, contract_options(gen.kind, 1)).transitions
    c = sample(gen, random_hopper(), 60, contract_options(gen.kind, 2)).transitions
    more = sample(gen, random_hopper(), 400, contract_options(gen.kind, 1)).transitions  # a second chunk
    np.testing.assert_array_equal(a.observations, b.observations)
    assert not np.array_equal(a.observations, c.observations)
    # The first 60 transitions of a larger request are the same samples (the trim may cut the last episode).
    np.testing.assert_array_equal(more.observations[:59], a.observations[:59])


def check_save_load_round_trip(gen: LoadedGenerator) -> None:
    again = load_generator(gen.folder, device="cpu")
    for (k, v), (k2, v2) in zip(
        gen.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=0)
    weights = read_tensors(gen.folder / "model.safetensors")
    assert set(weights) == set(gen.model.state_dict())
    assert not list(gen.folder.glob("*.pt")) and not list(gen.folder.glob("*.pkl"))


def check_interrupted_training_resumes(kind: str, root: Path) -> None:
    """Ctrl-C at the 8th training loss of 12 steps, then the same call again: the weights of an
    uninterrupted run."""
    full = tiny_generator(kind, root / "full", steps=12)
    cls = type(full.model)
    original = cls.loss
    calls = {"n": 0}

    def dying_loss(self: Any, batch: dict[str, torch.Tensor]) -> Any:
        calls["n"] += 1
        if calls["n"] == 8 and self.training:
            raise KeyboardInterrupt
        return original(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, "loss", dying_loss)
        with pytest.raises(KeyboardInterrupt):
            tiny_generator(kind, root / "part", steps=12)
    resumed = tiny_generator(kind, root / "part", steps=12)
    # Bit-identical on the CPU; CUDA's convolution and attention kernels reduce in a run-dependent order,
    # so there two uninterrupted runs already differ in the last bits (the RNG streams are restored).
    tol = 1e-4 if torch.cuda.is_available() else 0.0
    for v, v2 in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(v, v2, rtol=tol, atol=tol)


def check_lineage(gen: LoadedGenerator) -> None:
    """What a sampled version records about ``gen``: its kind, folder, hash, preset and training length."""
    lineage = generator_lineage(gen)
    assert lineage["kind"] == gen.kind and lineage["folder"] == str(gen.folder.resolve())
    assert lineage["checkpoint_hash"] == gen.checkpoint_hash and lineage["checkpoint_hash"].startswith(
        "sha256:"
    )
    assert lineage["preset"] == gen.config["preset"]
    assert lineage["training"] == {"steps": gen.config["train"]["steps"], "budget_s": None}


def check_family(kind: str, root: Path, trained: LoadedGenerator | None = None) -> None:
    """Every check of the contract for ``kind``; ``trained`` (a tiny generator of ``kind`` that the checks
    only read) saves training one, ``root`` is an empty folder for the runs the checks train."""
    gen = trained if trained is not None else tiny_generator(kind, root / "gen")
    assert gen.kind == kind
    check_samples_are_valid(gen)
    check_seeds_decide_samples(gen)
    check_save_load_round_trip(gen)
    check_lineage(gen)
    check_interrupted_training_resumes(kind, root)
