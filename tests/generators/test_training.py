"""The shared training loop: schedule, checkpoints without pickle, exact resume after an interruption."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from generators.checkpoint import CheckpointError, flatten_state, read_tensors, unflatten_state
from generators.training import TrainConfig, lr_at, split, train


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


def test_interrupted_training_resumes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = Quadratic()
    train(full, data(), CFG, tmp_path / "full")

    torch.manual_seed(0)
    part = Quadratic()

    def interrupt(step: int, _m: dict[str, float]) -> None:
        if step == 120:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(part, data(), CFG, tmp_path / "part", on_step=interrupt)
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
