"""Columnar decoding of diffused samples (:func:`generators.diffusion.decode_transitions`,
:func:`generators.tokens.decode_windows`), stacking and trimming of the blocks, and sampled versions,
against the per-episode construction they replaced.

The oracle functions below are that construction, kept here only: one ``Episode`` per sample, a list of
them trimmed episode by episode and flattened by ``episodes_to_transitions``. Every comparison is exact
(dtypes and bits), old against new in the same run, so nothing machine-specific is hard-coded.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SharedGenerator, random_hopper

from rlsynth.datasets.catalog import Catalog
from rlsynth.datasets.types import BoxSpace, Dataset, Episode, Transitions, episodes_to_transitions
from rlsynth.datasets.validation import validate_episodes
from rlsynth.generators.api import CHUNKS, LoadedGenerator, SampleOptions, diffused, draw
from rlsynth.generators.diffusion import decode_transitions
from rlsynth.generators.sampling import Drawn, stack_blocks, trim
from rlsynth.generators.tokens import TokenLayout, decode_windows

# --- the per-episode construction, as it was ------------------------------------------------------------


def oracle_transitions(layout: TokenLayout, x: np.ndarray) -> tuple[list[Episode], np.ndarray]:
    o, a = layout.obs_dim, layout.act_dim
    out = []
    for row in x:
        out.append(
            Episode.ending(
                np.stack([row[:o], row[o + a + 1 : o + a + 1 + o]]),
                layout.decode_actions(row[o : o + a])[None],
                row[o + a : o + a + 1],
                terminated=bool(row[-1] > 0.5),
            )
        )
    return out, np.arange(len(x), dtype=np.int64)


def oracle_windows(layout: TokenLayout, raw: np.ndarray) -> tuple[list[Episode], np.ndarray]:
    actions = layout.decode_actions(raw[:, :, layout.act])
    episodes, kept = [], []
    for i, (w, act) in enumerate(zip(raw, actions, strict=True)):
        h = w.shape[0]
        done = w[:, -1] > 0.5
        ends = np.flatnonzero(done[: h - 1])
        n = int(ends[0]) + 1 if ends.size else h - 1
        if n < 1:
            continue
        episodes.append(
            Episode.ending(w[: n + 1, layout.obs], act[:n], w[:n, -2], terminated=bool(ends.size))
        )
        kept.append(i)
    return episodes, np.asarray(kept, np.int64)


def oracle_trim(episodes: list[Episode], n: int) -> list[Episode]:
    out, total = [], 0
    for e in episodes:
        if total + e.length <= n:
            out.append(e)
            total += e.length
        else:
            k = n - total
            out.append(
                Episode.ending(e.observations[: k + 1], e.actions[:k], e.rewards[:k], terminated=False)
            )
            total = n
        if total == n:
            break
    return out


def oracle_decode(gen: LoadedGenerator, raw: np.ndarray) -> tuple[list[Episode], np.ndarray]:
    return (oracle_transitions if gen.kind == "transition" else oracle_windows)(gen.layout, raw)


def oracle_draw(
    gen: LoadedGenerator, source: Dataset, n: int, opts: SampleOptions
) -> tuple[Dataset, np.ndarray]:
    """A cold ``draw(..., keep=True)`` as it was: episodes collected chunk by chunk, trimmed, validated and
    flattened (the raw samples come from the family's unchanged chunk maker)."""
    make = diffused(gen).maker(gen, source, opts, None)
    episodes: list[Episode] = []
    kept: list[np.ndarray] = []
    first = 0
    while sum(e.length for e in episodes) < n:
        raw = make(first, CHUNKS[gen.kind], None)
        got, idx = oracle_decode(gen, raw)
        episodes.extend(got)
        kept.append(raw[idx])
        first += CHUNKS[gen.kind]
    out = oracle_trim(episodes, n)
    validate_episodes(out, gen.info, f"{gen.kind} samples")
    ds = Dataset(info=gen.info, transitions=episodes_to_transitions(out), source=f"{gen.kind} samples")
    return ds, np.concatenate(kept)[: len(out)]


# --- helpers --------------------------------------------------------------------------------------------


def assert_same(new: Transitions, old: Transitions) -> None:
    for col in Transitions.columns():
        a, b = getattr(new, col), getattr(old, col)
        assert a.dtype == b.dtype and a.shape == b.shape, col
        np.testing.assert_array_equal(a, b, err_msg=col)


def layouts() -> list[TokenLayout]:
    """Hopper-shaped spaces: a bounded action box, an unbounded one, and a box bounded in one dimension."""
    obs = BoxSpace.unbounded(11)
    half = BoxSpace(np.array([-1.0, -np.inf, 0.0], np.float32), np.array([1.0, np.inf, 2.0], np.float32))
    act = [BoxSpace(np.full(3, -1.0, np.float32), np.full(3, 1.0, np.float32)), BoxSpace.unbounded(3), half]
    return [TokenLayout.for_spaces(obs, a) for a in act]


def random_windows(layout: TokenLayout, b: int, h: int, seed: int) -> np.ndarray:
    """Raw windows whose done flags fall anywhere (the first token, mid-window, the last token, never)."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(scale=2.0, size=(b, h, layout.dim)).astype(np.float32)
    raw[:, :, -1] = rng.choice([0.0, 0.2, 0.5, 0.9], size=(b, h), p=[0.7, 0.1, 0.1, 0.1])
    raw[: b // 4, :, -1] = 0.0  # some windows never end (truncated after H − 1 steps)
    return raw


# --- decoding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", layouts(), ids=["bounded", "unbounded", "mixed"])
def test_transition_decode_is_the_per_row_episodes_flattened(layout: TokenLayout) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(scale=2.0, size=(1000, 2 * layout.obs_dim + layout.act_dim + 2)).astype(np.float32)
    x[:, -1] = rng.choice([0.0, 0.5, 0.5000001, 1.0, np.nan], size=len(x))  # 0.5 is not > 0.5; NaN is not
    block, idx = decode_transitions(layout, x)
    episodes, old_idx = oracle_transitions(layout, x)
    assert_same(block, episodes_to_transitions(episodes))
    np.testing.assert_array_equal(idx, old_idx)
    assert idx.dtype == np.int64


@pytest.mark.parametrize("layout", layouts(), ids=["bounded", "unbounded", "mixed"])
@pytest.mark.parametrize("h", [2, 8, 32])
def test_window_decode_is_the_per_window_episodes_flattened(layout: TokenLayout, h: int) -> None:
    raw = random_windows(layout, 300, h, seed=h)
    block, idx = decode_windows(layout, raw)
    episodes, old_idx = oracle_windows(layout, raw)
    assert_same(block, episodes_to_transitions(episodes))
    np.testing.assert_array_equal(idx, old_idx)
    assert idx.dtype == np.int64


def test_window_decode_of_one_token_windows_gives_no_episode() -> None:
    """H = 1 has no step: every window is dropped (the old construction's n < 1)."""
    layout = layouts()[0]
    block, idx = decode_windows(layout, random_windows(layout, 5, 1, seed=0))
    assert (
        len(block) == 0 and len(idx) == 0 and oracle_windows(layout, random_windows(layout, 5, 1, 0))[0] == []
    )
    assert block.observations.shape == (0, layout.obs_dim) and block.actions.shape == (0, layout.act_dim)


@pytest.mark.parametrize("kind", ["transition", "trajectory"])
def test_a_familys_episode_view_is_the_old_decode(shared_generator: SharedGenerator, kind: str) -> None:
    """``Family.decode`` (what per-sample pilot measures read) gives the episodes the old decode gave."""
    gen = shared_generator(kind)
    lay = gen.layout
    if kind == "trajectory":
        raw = random_windows(lay, 64, 8, seed=1)
    else:
        raw = np.random.default_rng(1).normal(size=(64, 2 * lay.obs_dim + lay.act_dim + 2)).astype(np.float32)
    got, idx = diffused(gen).decode(gen, raw)
    want, old_idx = oracle_decode(gen, raw)
    np.testing.assert_array_equal(idx, old_idx)
    assert len(got) == len(want)
    assert_same(episodes_to_transitions(got), episodes_to_transitions(want))


# --- stacking and trimming ------------------------------------------------------------------------------


def test_stacked_blocks_number_their_episodes_on() -> None:
    layout = layouts()[0]
    chunks = [random_windows(layout, 40, 8, seed=s) for s in range(3)]
    blocks = [decode_windows(layout, c)[0] for c in chunks]
    old = [e for c in chunks for e in oracle_windows(layout, c)[0]]
    assert_same(stack_blocks(blocks), episodes_to_transitions(old))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 123, 10_000])
def test_trimming_the_block_is_trimming_the_episodes(n: int) -> None:
    """Exact episode boundaries, cuts inside an episode (terminal or truncated), and n beyond the rows."""
    layout = layouts()[0]
    raw = random_windows(layout, 60, 8, seed=3)
    block, idx = decode_windows(layout, raw)
    samples = raw[idx]
    got = trim(Drawn(block, samples), n)
    want = oracle_trim(oracle_windows(layout, raw)[0], n)
    assert_same(got.transitions, episodes_to_transitions(want))
    assert got.samples is not None
    np.testing.assert_array_equal(got.samples, samples[: len(want)])


# --- sampled versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "n"), [("transition", 5000), ("trajectory", 777)])
def test_a_sampled_version_is_the_one_the_per_episode_path_made(
    shared_generator: SharedGenerator, catalog: Catalog, kind: str, n: int
) -> None:
    """Several chunks (ids numbered across them) and, for windows, a cut last episode: the same columns,
    dtypes, kept samples and catalog content hash as the per-episode construction."""
    gen = shared_generator(kind)
    src, opts = random_hopper(), SampleOptions(seed=3)
    ds, kept = draw(gen, src, n, opts, keep=True)
    old, old_kept = oracle_draw(gen, src, n, opts)
    assert_same(ds.transitions, old.transitions)
    assert ds.source == old.source and ds.info == old.info
    assert kept is not None
    np.testing.assert_array_equal(kept, old_kept)
    hashes = [
        catalog.manifest(catalog.write(name, d))["content_hash"] for name, d in (("new", ds), ("old", old))
    ]
    assert hashes[0] == hashes[1]
