"""One training loop for every generator family.

AdamW, linear warm-up then cosine decay, gradient clipping, an EMA of the weights, a held-out validation
loss, seeded batches, a progress bar with loss and it/s, and checkpoints that resume exactly: the raw and
EMA weights, the optimiser moments, the step and the batch RNG are saved (safetensors + JSON) every
``checkpoint_every`` steps and on Ctrl-C, and a later call with the same folder continues from there.

A model only has to be an ``nn.Module`` with ``loss(batch) -> (scalar tensor, metrics dict)`` where
``batch`` maps names to tensors whose first axis is the sample axis. The data a run draws batches from maps
names to tensors, or to :class:`Rows` that gather samples by index without holding them as one tensor
(trajectory windows: :class:`generators.tokens.WindowStore`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rlsynth.generators.checkpoint import (
    CheckpointError,
    flatten_state,
    read_json,
    read_tensors,
    unflatten_state,
    write_json,
    write_tensors,
)

Batch = dict[str, torch.Tensor]


class Rows(Protocol):
    """Samples gathered by index (B,) -> tensor (B, ...), for data too large to hold one row per sample."""

    def __len__(self) -> int: ...

    def index(self, idx: torch.Tensor) -> torch.Tensor: ...


Column = torch.Tensor | Rows
Data = Mapping[str, Column]
"""What training draws batches from: columns sharing their first (sample) axis."""


def rows_of(column: Column, idx: torch.Tensor) -> torch.Tensor:
    """The samples ``idx`` of one column."""
    return column[idx] if isinstance(column, torch.Tensor) else column.index(idx)


class Trainable(Protocol):
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by all generator families."""

    steps: int = 20_000
    """Gradient steps (with ``budget_s``: the most the run may plan)."""
    budget_s: float | None = None
    """Wall-clock budget of the whole run in seconds. When set, the run times its own steps on this machine
    (steps 10-60 of the process) and plans the most steps that fit (``BUDGET_MARGIN`` of the budget left
    for validation and checkpoints), rounded down to a multiple of ``eval_every``, at most ``steps``; the
    cosine schedule then ends there. The plan is saved with the training state: a resumed run finishes
    the same schedule. Step counts, and so the weights, depend on the machine's speed."""
    batch_size: int = 256
    """Samples per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 500
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """The cosine decays to this fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights (0 disables EMA)."""
    val_fraction: float = 0.05
    """Fraction of samples held out for the validation loss."""
    eval_every: int = 1000
    """Steps between validation losses."""
    checkpoint_every: int = 2000
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seeds initialisation, the train/validation split and batch sampling."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    threads: int = 0
    """CPU threads for torch (0: all cores)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    val_loss: float | None
    history: list[dict[str, float]]
    resumed_from: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device '{name}' requested but CUDA is not available")
    return dev


def configure_threads(threads: int) -> None:
    n = threads or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


BUDGET_MARGIN = 0.92
"""Share of ``budget_s`` planned for gradient steps (validation and checkpoints measured 3-4% of a run)."""
CALIBRATION = (10, 60)
"""Steps of a process timed to plan a budgeted run: the first 10 are skipped (allocator and cache warm-up).
They lie inside every preset's warm-up, whose learning rates do not depend on the planned total."""


def plan_steps(seconds_per_step: float, cfg: TrainConfig, done: int) -> int:
    """Steps of a ``budget_s`` run at ``seconds_per_step``: a multiple of ``eval_every`` (at least one),
    never fewer than the ``done`` ones, never more than ``cfg.steps``."""
    if cfg.budget_s is None:
        return cfg.steps
    fit = int(cfg.budget_s * BUDGET_MARGIN / max(seconds_per_step, 1e-9))
    fit -= fit % cfg.eval_every
    return min(cfg.steps, max(fit, cfg.eval_every, done))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine: lr·s/w for s < w, then lr·(r + (1−r)·½(1+cos(π·p))) with p the decay progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation row indices (seeded; at least one row each when n >= 2)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 and val_fraction > 0 else 0
    return perm[n_val:], perm[:n_val]


def _take(data: Data, idx: torch.Tensor, device: torch.device) -> Batch:
    return {k: rows_of(v, idx).to(device, non_blocking=True) for k, v in data.items()}


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)
        for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
            eb.copy_(b)


def validation_loss(
    model: nn.Module,
    data: Data,
    idx: torch.Tensor,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> float | None:
    """Mean loss over the validation rows, with a fixed RNG so the number is comparable across steps."""
    if len(idx) == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for lo in range(0, len(idx), batch_size):
            b = idx[lo : lo + batch_size]
            loss, _ = model.loss(_take(data, b, device))  # type: ignore[operator]
            total += float(loss) * len(b)
            count += len(b)
    model.train(was_training)
    return total / count


STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
MODEL_FILE = "model.safetensors"


def _rng_states(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch sampler's stream and the streams loss() draws noise from (CPU, and the GPU's when on one)."""
    states = {"rng": gen.get_state(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: Mapping[str, torch.Tensor], gen: torch.Generator, device: torch.device) -> None:
    gen.set_state(states["rng"])
    torch.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


def _save_state(
    out: Path,
    step: int,
    model: nn.Module,
    ema: nn.Module | None,
    opt: torch.optim.Optimizer,
    rng: Mapping[str, torch.Tensor],
    history: list[dict[str, float]],
    fingerprint: dict[str, Any],
    planned: int | None,
) -> None:
    opt_tensors, opt_skel = flatten_state(opt.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
    # Models draw randomness inside loss() (bootstrap resamples, diffusion noise): those streams are kept too.
    tensors.update(rng)
    # Tensors first, JSON last: a state.json always describes a complete state.safetensors.
    write_tensors(out / STATE_TENSORS, tensors)
    write_tensors(out / MODEL_FILE, (ema or model).state_dict())
    write_json(
        out / STATE_JSON,
        {
            "step": step,
            "planned_steps": planned,
            "optimizer": opt_skel,
            "history": history,
            "fingerprint": fingerprint,
        },
    )


def _load_state(
    out: Path,
    model: nn.Module,
    ema: nn.Module | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    device: torch.device,
    fingerprint: dict[str, Any],
) -> tuple[int, list[dict[str, float]], int | None]:
    meta = read_json(out / STATE_JSON)
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{out}: holds training state for another configuration; use a new --out folder"
        )
    tensors = read_tensors(out / STATE_TENSORS)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt.load_state_dict(
        unflatten_state({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"])
    )
    _set_rng_states(tensors, gen, device)
    planned = meta.get("planned_steps")
    return int(meta["step"]), list(meta["history"]), None if planned is None else int(planned)


def resume_fingerprint(cfg: TrainConfig, fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a state must have been saved under to be resumed, in its JSON form (tuples become lists),
    as state.json holds it; progress, device and threads may change between runs."""
    train_cfg = asdict(cfg) | {"progress": None, "device": None, "threads": None}
    if cfg.budget_s is None:
        train_cfg.pop("budget_s")  # states saved before budgets existed resume unchanged
    blob = {"train": train_cfg, **dict(fingerprint or {})}
    return dict(json.loads(json.dumps(blob)))


def check_resumable(out: Path, cfg: TrainConfig, fingerprint: Mapping[str, Any] | None) -> None:
    """Raise :class:`CheckpointError` if ``out`` holds training state of another configuration."""
    state = out / STATE_JSON
    if state.exists() and read_json(state).get("fingerprint") != resume_fingerprint(cfg, fingerprint):
        raise CheckpointError(
            f"{out}: holds training state for another configuration; use a new --out folder"
        )


def train(
    model: nn.Module,
    data: Data,
    cfg: TrainConfig,
    out: Path,
    *,
    fingerprint: Mapping[str, Any] | None = None,
    desc: str = "train",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train ``model`` on ``data`` (columns sharing their first axis), checkpointing into ``out``.

    If ``out`` holds a state from the same ``fingerprint`` (model + train config), training resumes from it.
    The deployable weights (EMA when enabled) end in ``out/model.safetensors``. ``clock`` times the steps
    that plan a ``budget_s`` run.
    """
    from tqdm.auto import tqdm

    configure_threads(cfg.threads)
    device = resolve_device(cfg.device)
    n = len(next(iter(data.values())))
    if n < 2:
        raise CheckpointError(f"need at least 2 training samples, got {n}")
    out.mkdir(parents=True, exist_ok=True)
    fp = resume_fingerprint(cfg, fingerprint)
    model.to(device).train()
    ema = copy.deepcopy(model).eval() if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train_idx, val_idx = split(n, cfg.val_fraction, cfg.seed)
    start, history, planned = 0, list[dict[str, float]](), None
    if (out / STATE_JSON).exists():
        start, history, planned = _load_state(out, model, ema, opt, gen, device, fp)
    if cfg.budget_s is None:
        planned = cfg.steps
    # Until a budgeted run has planned, it runs toward the cap (the warm-up does not depend on the total).
    run = cfg if planned is None else replace(cfg, steps=planned)
    step = saved = start
    t_cal = 0.0
    # A finished run re-run (nothing left to train) reports the last recorded loss, not NaN.
    loss_val = float(history[-1]["loss"]) if history else float("nan")
    rng_before: dict[str, torch.Tensor] | None = None
    t0 = time.perf_counter()
    bar = tqdm(
        total=run.steps,
        initial=start,
        desc=desc,
        disable=not cfg.progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    try:
        while step < run.steps:
            if planned is None and step - start == CALIBRATION[0]:
                t_cal = clock()
            if planned is None and step - start == CALIBRATION[1]:
                planned = plan_steps((clock() - t_cal) / (CALIBRATION[1] - CALIBRATION[0]), cfg, step)
                run = replace(cfg, steps=planned)
                bar.total = planned
                bar.refresh()
                continue  # the plan may end here (a resumed run already past a small budget)
            # RNG states as of the start of this step: an interruption mid-step resumes from here.
            rng_before = _rng_states(gen, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, run)
            pick = train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=gen)]
            loss, metrics = model.loss(_take(data, pick, device))  # type: ignore[operator]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                _ema_update(ema, model, cfg.ema_decay)
            step += 1
            rng_before = None  # the step completed: the current RNG state is the one to keep
            loss_val = float(loss.detach())
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss_val:.4f}", refresh=False)
            if on_step is not None:
                on_step(step, metrics)
            if step % cfg.eval_every == 0 or step == run.steps:
                val = validation_loss(ema or model, data, val_idx, device, cfg.batch_size * 4, cfg.seed)
                history.append(
                    {
                        "step": step,
                        "loss": loss_val,
                        "val_loss": float("nan") if val is None else val,
                        "lr": lr_at(step - 1, run),
                    }
                )
            if step % cfg.checkpoint_every == 0 or step == run.steps:
                _save_state(out, step, model, ema, opt, _rng_states(gen, device), history, fp, planned)
                saved = step
        if saved != step:
            _save_state(out, step, model, ema, opt, _rng_states(gen, device), history, fp, planned)
    except KeyboardInterrupt:
        # An interruption mid-step resumes from the RNG states as of that step's start.
        rng = rng_before if rng_before is not None else _rng_states(gen, device)
        _save_state(out, step, model, ema, opt, rng, history, fp, planned)
        raise
    finally:
        bar.close()
    if ema is not None:
        # The caller's model leaves training holding the deployable (EMA) weights.
        model.load_state_dict(ema.state_dict())
    model.eval()
    val = validation_loss(model, data, val_idx, device, cfg.batch_size * 4, cfg.seed)
    return TrainResult(
        steps=step,
        seconds=time.perf_counter() - t0,
        final_loss=loss_val,
        val_loss=val,
        history=history,
        resumed_from=start,
    )
