"""Helpers shared by the tests: tiny datasets built in memory, exact comparisons, tiny generators and
agents, and the benchmark scripts loaded as modules."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rlsynth.datasets.envs import env_info
from rlsynth.datasets.types import Dataset, DatasetInfo, Episode, Transitions, episodes_to_transitions

if TYPE_CHECKING:
    from rlsynth.generators.api import LoadedGenerator


@functools.cache
def hopper_info() -> DatasetInfo:
    return env_info("Hopper-v5")


def make_episode(
    rng: np.random.Generator, length: int, terminated: bool, obs_dim: int = 11, act_dim: int = 3
) -> Episode:
    last = np.zeros(length, bool)
    last[-1] = True
    none = np.zeros(length, bool)
    return Episode(
        observations=rng.normal(size=(length + 1, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
        rewards=rng.normal(size=length).astype(np.float32),
        terminations=last if terminated else none,
        truncations=none if terminated else last,
    )


def make_dataset(seed: int = 0, lengths: tuple[int, ...] = (5, 9, 3, 12), source: str = "test") -> Dataset:
    """Hopper-shaped random episodes, alternating terminated / truncated."""
    rng = np.random.default_rng(seed)
    eps = [make_episode(rng, n, terminated=i % 2 == 0) for i, n in enumerate(lengths)]
    return Dataset(info=hopper_info(), transitions=episodes_to_transitions(eps), source=source)


def assert_same_transitions(a: Dataset, b: Dataset) -> None:
    for col in Transitions.columns():
        x, y = getattr(a.transitions, col), getattr(b.transitions, col)
        assert x.dtype == y.dtype, col
        np.testing.assert_array_equal(x, y, err_msg=col)


TINY: dict[str, dict[str, Any]] = {
    # Polish off: the tests that need it ask for it (the presets' default would multiply sampling time).
    "trajectory": {"horizon": 8, "channels": (8, 16), "emb": 16, "sample_steps": 3, "polish": 0},
    "transition": {"width": 32, "depth": 1, "emb": 16, "sample_steps": 3, "polish": 0},
    "autoregressive": {"horizon": 8, "width": 16, "depth": 1, "heads": 2, "sigma_start": 0.0, "polish": 0},
    "world-model": {"ensemble": 2, "elites": 1, "hidden": 16, "layers": 1},
}
TINY_TRAIN = {"batch_size": 16, "warmup_steps": 2, "eval_every": 5, "checkpoint_every": 5, "threads": 1}


@functools.cache
def random_hopper() -> Dataset:
    """300 transitions of the real Hopper-v5 under uniform random actions (the ``random`` recipe)."""
    from rlsynth.datasets.recipes import RecipeConfig, build

    return build(RecipeConfig("random", "Hopper-v5", transitions=300, seed=0, progress=False)).dataset


def tiny_generator(kind: str, out: Path, steps: int = 10, **overrides: Any) -> LoadedGenerator:
    """A tiny ``kind`` generator trained ``steps`` steps on :func:`random_hopper` (machinery, not quality)."""
    from rlsynth.generators.api import load_generator, train_generator

    train_generator(
        kind,
        random_hopper(),
        out,
        steps=steps,
        seed=0,
        progress=False,
        model_overrides={**TINY[kind], **overrides},
        train_overrides=TINY_TRAIN,
    )
    return load_generator(out, device="cpu")


class SharedGenerator(Protocol):
    """The ``shared_generator`` fixture: :func:`tiny_generator` without a folder, trained once a session."""

    def __call__(self, kind: str, steps: int = 10, **overrides: Any) -> LoadedGenerator: ...


def generator_cache(root: Path) -> SharedGenerator:
    """:func:`tiny_generator` trained once per (kind, steps, overrides) into ``root``: for the tests that only
    read a generator (one that tampers with its folder trains its own)."""
    made: dict[str, LoadedGenerator] = {}

    def get(kind: str, steps: int = 10, **overrides: Any) -> LoadedGenerator:
        key = json.dumps([kind, steps, overrides], sort_keys=True)
        if key not in made:
            made[key] = tiny_generator(kind, root / f"{kind}-{len(made)}", steps, **overrides)
        return made[key]

    return get


def tiny_agent(config: Any, data: Dataset | None = None, steps: int = 10, save_to: Path | None = None) -> Any:
    """A d3rlpy algorithm from ``config`` fitted ``steps`` steps on ``data`` (default: :func:`make_dataset`);
    saved to ``save_to`` when given (machinery, not quality)."""
    from rlsynth.datasets.d3rlpy_setup import noop_logger
    from rlsynth.offline_rl.buffers import to_replay_buffer

    algo = config.create(device="cpu:0")
    algo.fit(
        to_replay_buffer(data if data is not None else make_dataset()),
        n_steps=steps,
        n_steps_per_epoch=steps,
        logger_adapter=noop_logger(),
        show_progress=False,
    )
    if save_to is not None:
        algo.save(str(save_to))
    return algo


BENCH = Path(__file__).resolve().parents[1] / "bench"


@functools.cache
def load_bench(name: str) -> ModuleType:
    """``bench/NAME.py`` as a module (the benchmarks are scripts, not a package), loaded once."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def big_transitions(episodes: int, length: int) -> Transitions:
    """Episodes of ``length`` steps built in whole arrays (a per-episode loop would dominate the test)."""
    n = episodes * length
    step = np.tile(np.arange(length, dtype=np.int32), episodes)
    last = step == length - 1
    terminated = last & (np.repeat(np.arange(episodes), length) % 2 == 0)
    obs = np.repeat(step.astype(np.float32)[:, None], hopper_info().observation_space.dim, axis=1)
    return Transitions(
        episode_id=np.repeat(np.arange(episodes, dtype=np.int64), length),
        step=step,
        observations=obs,
        actions=np.zeros((n, hopper_info().action_space.dim), np.float32),
        rewards=(step % 3).astype(np.float32),
        next_observations=obs + 1,
        terminals=terminated,
        timeouts=last & ~terminated,
    )


# Allocator settings that make a child's address space and data segment follow live memory: Arrow's
# mimalloc and glibc's per-thread arenas reserve large ranges up front, and glibc keeps freed heap mapped.
CAPPED_CHILD_ENV = {
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "65536",
}


def run_capped_child(script: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run ``script`` (which caps its own memory) in a fresh interpreter with :data:`CAPPED_CHILD_ENV`;
    it must succeed, and the JSON on its last output line is returned."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CAPPED_CHILD_ENV, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])
