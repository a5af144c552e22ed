"""The shared training loop: schedule, checkpoints without pickle, exact resume after an interruption."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rlsynth.generators.checkpoint import CheckpointError, flatten_state, read_tensors, unflatten_state
from rlsynth.generators.training import BUDGET_MARGIN, TrainConfig, lr_at, plan_steps, split, train


class Quadratic(nn.Module):
    """y = w·x + b with a noisy loss (uses the global RNG inside loss, as diffusion models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        jitter = 1e-3 * torch.randn(batch["x"].shape[0], 1, device=batch["x"].device)
        err = self.lin(batch["x"]) + jitter - batch["y"]
        return (err**2).mean(), {}


def data(n: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return {"x": x, "y": x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3}


CFG = TrainConfig(
    steps=200,
    batch_size=16,
    lr=0.05,
    warmup_steps=10,
    eval_every=50,
    checkpoint_every=50,
    ema_decay=0.9,
    progress=False,
    threads=1,
)


def test_lr_schedule_closed_form() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_split_is_seeded_and_disjoint() -> None:
    tr, va = split(100, 0.1, 3)
    assert len(va) == 10 and len(set(tr.tolist()) | set(va.tolist())) == 100
    assert torch.equal(split(100, 0.1, 3)[1], va)


def test_training_learns_and_writes_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = Quadratic()
    res = train(m, data(), CFG, tmp_path)
    assert res.steps == 200 and res.val_loss is not None and res.val_loss < 0.01
    assert [h["step"] for h in res.history] == [50, 100, 150, 200]
    weights = read_tensors(tmp_path / "model.safetensors")
    torch.testing.assert_close(weights["lin.weight"], m.lin.weight.detach().cpu())  # EMA weights are deployed


def interrupted_at_120(cfg: TrainConfig, out: Path, **kwargs: Any) -> None:
    """Train a fresh (seed 0) model into ``out`` and stop it with Ctrl-C after step 120."""
    torch.manual_seed(0)

    def interrupt(step: int, _m: dict[str, float]) -> None:
        if step == 120:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(Quadratic(), data(), cfg, out, on_step=interrupt, **kwargs)


def test_interrupted_training_resumes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = Quadratic()
    train(full, data(), CFG, tmp_path / "full")

    interrupted_at_120(CFG, tmp_path / "part")
    torch.manual_seed(123)  # whatever the process does in between must not matter
    resumed = Quadratic()
    res = train(resumed, data(), CFG, tmp_path / "part")
    assert res.resumed_from == 120
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Re-running a finished run trains nothing and reports the last recorded loss (not NaN).
    again = train(Quadratic(), data(), CFG, tmp_path / "part")
    assert again.resumed_from == again.steps == res.steps
    assert math.isfinite(again.final_loss) and again.final_loss == res.history[-1]["loss"]


def test_plan_steps_fits_the_budget() -> None:
    cfg = TrainConfig(steps=10_000, eval_every=100, budget_s=100.0)
    # 100 s at 0.01 s per step: 9,200 steps fit the margin; 0.013 s: 7,076 -> 7,000 (a multiple of 100).
    assert plan_steps(0.01, cfg, 60) == int(100 * BUDGET_MARGIN / 0.01) == 9_200
    assert plan_steps(0.013, cfg, 60) == 7_000
    assert plan_steps(0.001, cfg, 60) == 10_000  # the cap
    assert plan_steps(10.0, cfg, 60) == 100  # at least one evaluation interval
    assert plan_steps(10.0, cfg, 460) == 460  # never fewer than the steps already done
    assert plan_steps(10.0, TrainConfig(steps=300), 60) == 300  # no budget: the configured steps


class FakeClock:
    """Each call is ``dt`` seconds after the previous one: the loop reads it twice to time 50 steps."""

    def __init__(self, dt: float) -> None:
        self.t, self.dt = 0.0, dt

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


def test_budgeted_run_plans_its_steps_and_resumes_the_plan(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 1_000, "eval_every": 20, "budget_s": 2.0})
    # 0.5 s over 50 timed steps = 0.01 s per step: 2 s x 0.92 / 0.01 = 184 -> 180 steps.
    torch.manual_seed(0)
    full = Quadratic()
    res = train(full, data(), cfg, tmp_path / "full", clock=FakeClock(0.5))
    assert res.steps == 180 and res.history[-1]["step"] == 180
    assert res.history[-1]["lr"] == pytest.approx(lr_at(179, TrainConfig(**{**cfg.__dict__, "steps": 180})))
    assert res.history[-1]["lr"] < 0.1 * cfg.lr  # the cosine ran to the planned end, not toward the cap

    interrupted_at_120(cfg, tmp_path / "part", clock=FakeClock(0.5))
    # A resumed run keeps the saved plan even on a machine 4x as fast: the same weights.
    resumed = Quadratic()
    again = train(resumed, data(), cfg, tmp_path / "part", clock=FakeClock(0.125))
    assert again.resumed_from == 120 and again.steps == 180
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train(Quadratic(), data(), CFG, tmp_path)
    with pytest.raises(CheckpointError, match="another configuration"):
        train(Quadratic(), data(), TrainConfig(**{**CFG.__dict__, "lr": 0.01}), tmp_path)


def test_optimizer_state_round_trips_without_pickle() -> None:
    m = nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    tensors, skel = flatten_state(opt.state_dict())
    back = unflatten_state(tensors, skel)
    import json

    assert json.dumps(back["param_groups"]) == json.dumps(opt.state_dict()["param_groups"])
    torch.testing.assert_close(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
