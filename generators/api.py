"""Train, load and sample generators by kind; what the CLI and the pipeline call.

A trained generator is a folder (see :mod:`generators.checkpoint`): ``config.json`` (kind, model and
training config, the source dataset and its lineage entry), ``normaliser.json``, ``model.safetensors``,
the resumable training state, ``train.json`` (loss history, timings) and ``loss.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.errors import RlsynthError
from datasets.fidelity import window_starts
from datasets.types import Dataset, DatasetInfo, Episode, episodes_to_transitions
from datasets.validation import validate_episodes
from generators.checkpoint import CheckpointError, checkpoint_hash, read_json, read_tensors, write_json
from generators.training import TrainConfig, TrainResult, resolve_device, train
from generators.world_model import (
    WorldModel,
    WorldModelConfig,
    WorldModelNormalisers,
    model_step,
    training_tensors,
)

KINDS = ("world-model",)
PRESETS: dict[str, dict[str, tuple[Any, TrainConfig]]] = {
    "world-model": {
        # A usable model of a 100k-transition dataset in a few minutes on 2 CPU cores.
        "cpu-small": (
            WorldModelConfig(ensemble=5, elites=4, hidden=200, layers=3),
            TrainConfig(
                steps=10_000,
                batch_size=256,
                lr=1e-3,
                weight_decay=5e-5,
                warmup_steps=200,
                ema_decay=0.0,
                eval_every=1000,
                checkpoint_every=2000,
            ),
        ),
        # MOPO's sizes: 7 members, 5 elites, 4 hidden layers of 200.
        "gpu-paper": (
            WorldModelConfig(ensemble=7, elites=5, hidden=200, layers=4),
            TrainConfig(
                steps=100_000,
                batch_size=256,
                lr=1e-3,
                weight_decay=5e-5,
                warmup_steps=1000,
                ema_decay=0.0,
                eval_every=2000,
                checkpoint_every=5000,
            ),
        ),
    },
}
SAMPLE_CHUNK = 256


def preset(kind: str, name: str) -> tuple[Any, TrainConfig]:
    if kind not in PRESETS:
        raise RlsynthError(f"unknown generator kind '{kind}' (kinds: {', '.join(KINDS)})")
    if name not in PRESETS[kind]:
        raise RlsynthError(f"unknown preset '{name}' for {kind} (presets: {', '.join(PRESETS[kind])})")
    return PRESETS[kind][name]


@dataclass
class LoadedGenerator:
    kind: str
    folder: Path
    config: dict[str, Any]
    model: WorldModel
    norms: WorldModelNormalisers
    info: DatasetInfo

    @property
    def checkpoint_hash(self) -> str:
        return checkpoint_hash(self.folder)


def train_generator(
    kind: str,
    dataset: Dataset,
    out: Path,
    *,
    preset_name: str = "cpu-small",
    steps: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``kind`` on ``dataset`` into ``out`` (resuming if ``out`` holds a run of the same config)."""
    model_cfg, train_cfg = preset(kind, preset_name)
    train_cfg = replace(train_cfg, progress=progress)
    if steps is not None:
        train_cfg = replace(train_cfg, steps=steps)
    if seed is not None:
        train_cfg = replace(train_cfg, seed=seed)
    if train_cfg.steps < 1:
        raise RlsynthError(f"steps must be positive, got {train_cfg.steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = dataset.transitions
    norms = WorldModelNormalisers.fit(t)
    config = {
        "kind": kind,
        "preset": preset_name,
        "model": asdict(model_cfg),
        "train": asdict(train_cfg),
        "data": {
            "info": dataset.info.to_json(),
            "source": source or {"source": dataset.source},
            "transitions": len(t),
        },
    }
    fingerprint = {"kind": kind, "model": asdict(model_cfg), "data": config["data"]}
    existing = out / "config.json"
    if existing.exists() and read_json(existing).get("data") != config["data"]:
        raise CheckpointError(f"{out}: holds a generator trained on other data; use a new --out folder")
    write_json(out / "config.json", config)
    write_json(out / "normaliser.json", norms.to_json())
    torch.manual_seed(train_cfg.seed)
    model = WorldModel(t.observations.shape[1], t.actions.shape[1], model_cfg)
    data = training_tensors(t, norms)
    result = train(model, data, train_cfg, out, fingerprint=fingerprint, desc=f"train {kind}")
    _finish_world_model(model, data, train_cfg, out)
    write_json(out / "train.json", {**asdict(result), "elites": [int(i) for i in model.elite_idx]})
    _plot_history(result, out / "loss.png", kind)
    return result


def _finish_world_model(
    model: WorldModel, data: dict[str, torch.Tensor], cfg: TrainConfig, out: Path
) -> None:
    from generators.checkpoint import write_tensors
    from generators.training import split

    _, val_idx = split(len(data["x"]), cfg.val_fraction, cfg.seed)
    device = next(model.parameters()).device
    model.select_elites(data["x"][val_idx].to(device), data["y"][val_idx].to(device))
    write_tensors(out / "model.safetensors", model.state_dict())


def _plot_history(result: TrainResult, path: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result.history:
        return
    steps = [h["step"] for h in result.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in result.history], label="train loss")
    ax.plot(steps, [h["val_loss"] for h in result.history], label="validation loss")
    ax.set_xlabel("step")
    ax.set_title(f"{kind} training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_generator(folder: str | Path, device: str = "auto") -> LoadedGenerator:
    f = Path(folder)
    if not f.is_dir():
        raise CheckpointError(f"{f}: no such generator folder")
    config = read_json(f / "config.json")
    kind = config.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{f}: unknown generator kind {kind!r}")
    info = DatasetInfo.from_json(config["data"]["info"])
    norms = WorldModelNormalisers.from_json(read_json(f / "normaliser.json"))
    try:
        model = WorldModel(
            info.observation_space.dim, info.action_space.dim, WorldModelConfig(**config["model"])
        )
        model.load_state_dict(read_tensors(f / "model.safetensors"))
    except (TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{f}: weights do not match the config ({e})") from None
    model.to(resolve_device(device)).eval()
    return LoadedGenerator(kind=kind, folder=f, config=config, model=model, norms=norms, info=info)


ActionFn = Callable[[torch.Tensor], torch.Tensor]


def _rollout_chunk(
    gen: LoadedGenerator,
    source: Dataset,
    rows: np.ndarray,
    horizon: int,
    policy: ActionFn | None,
    tg: torch.Generator,
) -> list[Episode]:
    """Roll B = len(rows) trajectories for up to ``horizon`` steps from the rows' states."""
    t = source.transitions
    model, norms = gen.model, gen.norms
    device = next(model.parameters()).device
    b, o = len(rows), model.obs_dim
    noise = torch.randn((horizon, b, o + 1), generator=tg).to(device)
    elites = model.elite_idx
    members = elites[torch.randint(len(elites), (horizon, b), generator=tg).to(elites.device)].to(device)
    obs = torch.as_tensor(np.array(t.observations[rows]), device=device)
    low = torch.as_tensor(source.info.action_space.low, device=device)
    high = torch.as_tensor(source.info.action_space.high, device=device)
    states, acts, rews, terms = [obs], [], [], []
    alive = torch.ones(b, dtype=torch.bool, device=device)
    ends = torch.full((b,), horizon, dtype=torch.long, device=device)
    terminated = torch.zeros(b, dtype=torch.bool, device=device)
    for k in range(horizon):
        if policy is None:
            act = torch.as_tensor(np.array(t.actions[rows + k]), device=device)
        else:
            act = torch.clamp(policy(obs), low, high)
        out = model_step(model, norms, obs, act, members[k], noise[k])
        stop_div = alive & out.diverged
        ends[stop_div] = k  # the diverged step is not kept
        alive &= ~out.diverged
        stop_term = alive & out.terminal
        ends[stop_term] = k + 1
        terminated |= stop_term
        alive &= ~out.terminal
        states.append(torch.where(out.diverged[:, None], obs, out.next_obs))
        acts.append(act)
        rews.append(out.reward)
        terms.append(out.terminal)
        obs = states[-1]
        if not alive.any():
            break
    s = torch.stack(states, 1).cpu().numpy()
    a, r = torch.stack(acts, 1).cpu().numpy(), torch.stack(rews, 1).cpu().numpy()
    episodes = []
    for i in range(b):
        n = int(ends[i])
        if n == 0:
            continue
        flags = np.zeros(n, bool)
        last = flags.copy()
        last[-1] = True
        done = bool(terminated[i])
        episodes.append(
            Episode(
                observations=s[i, : n + 1].astype(np.float32),
                actions=a[i, :n].astype(np.float32),
                rewards=r[i, :n].astype(np.float32),
                terminations=last if done else flags,
                truncations=flags if done else last,
            )
        )
    return episodes


def sample_world_model(
    gen: LoadedGenerator,
    source: Dataset,
    n_transitions: int,
    *,
    seed: int = 0,
    horizon: int = 32,
    policy: ActionFn | None = None,
) -> Dataset:
    """``n_transitions`` of rollouts from real start states of ``source``.

    ``policy=None`` replays the dataset's own actions after each start state (the start is drawn among rows
    with ``horizon`` steps left in their episode); otherwise actions come from ``policy(obs)``.
    Work is done in fixed chunks of 256 rollouts, each seeded by (seed, chunk): the result depends on the
    seed only, never on how a caller splits the work.
    """
    if n_transitions < 1 or horizon < 1:
        raise RlsynthError("n_transitions and horizon must be positive")
    if (
        source.info.observation_space != gen.info.observation_space
        or source.info.action_space != gen.info.action_space
    ):
        raise RlsynthError(f"{source.source} has other spaces than the generator's training data")
    t = source.transitions
    pool = window_starts(t, horizon) if policy is None else np.arange(len(t))
    if len(pool) == 0:
        raise RlsynthError(f"{source.source} has no episode with {horizon} steps to replay; lower --horizon")
    episodes: list[Episode] = []
    total, chunk = 0, 0
    while total < n_transitions:
        rng = np.random.default_rng([seed, chunk])
        tg = torch.Generator().manual_seed(int(rng.integers(2**62)))
        got = _rollout_chunk(gen, source, rng.choice(pool, size=SAMPLE_CHUNK), horizon, policy, tg)
        if not got:
            raise RlsynthError("every world-model rollout diverged at its first step; the model is unusable")
        episodes.extend(got)
        total += sum(e.length for e in got)
        chunk += 1
    episodes = _trim(episodes, n_transitions)
    validate_episodes(episodes, source.info, "world-model samples")
    return Dataset(
        info=source.info, transitions=episodes_to_transitions(episodes), source=f"{gen.kind} samples"
    )


def _trim(episodes: list[Episode], n: int) -> list[Episode]:
    """The first episodes holding exactly n transitions; the last one cut short ends truncated."""
    out, total = [], 0
    for e in episodes:
        if total + e.length <= n:
            out.append(e)
            total += e.length
        else:
            k = n - total
            flags = np.zeros(k, bool)
            last = flags.copy()
            last[-1] = True
            out.append(
                Episode(
                    e.observations[: k + 1].copy(), e.actions[:k].copy(), e.rewards[:k].copy(), flags, last
                )
            )
            total = n
        if total == n:
            break
    return out
