"""What a sampled version records about the generator(s) it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlsynth.generators.checkpoint import read_json
from rlsynth.generators.sampling import LoadedGenerator
from rlsynth.generators.training import STATE_JSON


def training_lineage(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """How long the model trained: its step count, and the wall-clock budget that planned it if any (a
    budgeted run's steps depend on the machine it ran on, so a version made from it says so)."""
    train = config.get("train", {})
    state = folder / STATE_JSON
    trained = read_json(state).get("step") if state.is_file() else None
    return {
        "steps": trained if trained is not None else train.get("steps"),
        "budget_s": train.get("budget_s"),
    }


def generator_lineage(gen: LoadedGenerator, refiner: LoadedGenerator | None = None) -> dict[str, Any]:
    """What a sampled version records about the model(s) it came from."""
    out: dict[str, Any] = {
        "kind": gen.kind,
        "folder": str(gen.folder.resolve()),
        "checkpoint_hash": gen.checkpoint_hash,
        "preset": gen.config.get("preset"),
        "training": training_lineage(gen.folder, gen.config),
    }
    if refiner is not None:
        out["refiner"] = {"folder": str(refiner.folder.resolve()), "checkpoint_hash": refiner.checkpoint_hash}
    return out
