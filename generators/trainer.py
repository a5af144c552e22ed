"""Training a family into a generator folder: the resolved configs from a preset and overrides, the files
written (see :mod:`generators.checkpoint`), and the staging folder that keeps a failed run from leaving a
half-made folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from rlsynth.datasets.types import Dataset
from rlsynth.generators.checkpoint import CheckpointError, read_json, write_json
from rlsynth.generators.families import FAMILIES
from rlsynth.generators.loading import record_refiner
from rlsynth.generators.plotting import plot_history
from rlsynth.generators.presets import preset
from rlsynth.generators.training import STATE_JSON, TrainResult, check_resumable, train

BUDGET_CAP_FACTOR = 10
"""A budgeted run plans at most this many times its preset's fixed steps unless given a cap."""


def train_generator(
    kind: str,
    dataset: Dataset,
    out: Path,
    *,
    preset_name: str = "cpu-small",
    steps: int | None = None,
    budget_s: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    refiner: Path | None = None,
) -> TrainResult:
    """Train ``kind`` on ``dataset`` into ``out`` (resuming if ``out`` holds a run of the same config);
    ``refiner`` is recorded as the drafter's default refiner. A failed run leaves no ``out`` behind
    (:func:`training_folder`).

    A preset trains its fixed step count (``steps`` replaces it). ``budget_s`` instead plans the steps that
    fit that many wall-clock seconds on this machine, with ``steps`` (default: ``BUDGET_CAP_FACTOR`` × the
    preset's) as the cap: more training where the machine allows, at the price of machine-dependent weights.
    """
    model_cfg, train_cfg = preset(kind, preset_name)
    family = FAMILIES[kind]
    model_cfg = replace(model_cfg, **(model_overrides or {}))
    train_cfg = replace(train_cfg, progress=progress, **(train_overrides or {}))
    if budget_s is not None:
        train_cfg = replace(train_cfg, steps=steps or BUDGET_CAP_FACTOR * train_cfg.steps, budget_s=budget_s)
    elif steps is not None:
        train_cfg = replace(train_cfg, steps=steps, budget_s=None)
    if seed is not None:
        train_cfg = replace(train_cfg, seed=seed)
    out = Path(out)
    # Data is prepared before anything is written: data the family cannot use leaves no folder behind.
    norms, data = family.prepare(dataset, model_cfg)
    config = {
        "kind": kind,
        "preset": preset_name,
        "model": asdict(model_cfg),
        "train": asdict(train_cfg),
        "data": {
            "info": dataset.info.to_json(),
            "source": source or {"source": dataset.source},
            "transitions": dataset.n_transitions,
        },
    }
    fingerprint = {"kind": kind, "model": asdict(model_cfg), "data": config["data"]}
    with training_folder(out) as work:
        existing = work / "config.json"
        if existing.exists() and read_json(existing).get("data") != config["data"]:
            raise CheckpointError(f"{work}: holds a generator trained on other data; use a new --out folder")
        # Refuse a resume of another configuration before config.json is rewritten (train() checks too late).
        check_resumable(work, train_cfg, fingerprint)
        write_json(work / "config.json", config)
        write_json(work / "normaliser.json", {k: v.to_json() for k, v in norms.items()})
        torch.manual_seed(train_cfg.seed)
        model = family.build(dataset.info, model_cfg)
        result = train(model, data, train_cfg, work, fingerprint=fingerprint, desc=f"train {kind}")
        family.finish(model, data, train_cfg, work)
        if refiner is not None:
            record_refiner(work, refiner)
        write_json(work / "train.json", asdict(result))
        plot_history(result, work / "loss.png", kind)
    return result


STAGING_SUFFIX = ".partial"


def staging_folder(out: Path) -> Path:
    """Where a fresh run into ``out`` trains until it succeeds: a hidden sibling, so the rename into
    place stays on one file system."""
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


@contextlib.contextmanager
def training_folder(out: Path) -> Iterator[Path]:
    """The folder a training run writes into, so that a failed run leaves no half-made ``out``.

    ``out`` holding files is a run to resume (or refuse): written in place, as before. Otherwise the run
    writes into :func:`staging_folder` and renames it to ``out`` on success. Ctrl-C (or SIGTERM, handled
    as Ctrl-C) saves a resumable state; that folder is renamed into place too, so the same command
    resumes. Any other failure removes what this run created; a staging folder left by a killed process
    is resumed from by the next run into the same ``out``.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        yield out
        return
    staging = staging_folder(out)
    made = _make_folders(staging)
    try:
        yield staging
    except KeyboardInterrupt:
        if (staging / STATE_JSON).exists():
            _move_into_place(staging, out)
        else:
            _remove_made(made)
        raise
    except BaseException:
        _remove_made(made)
        raise
    _move_into_place(staging, out)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, innermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_made(made: list[Path]) -> None:
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    for p in made[1:]:
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty: another process may have written beside us


def _move_into_place(staging: Path, out: Path) -> None:
    try:
        os.rename(staging, out)  # replaces an empty ``out`` folder; a non-empty one is an error
    except OSError as e:
        raise CheckpointError(
            f"{out}: cannot move the trained generator into place ({e.strerror}); it is in {staging}"
        ) from None
