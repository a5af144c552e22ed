"""Per-step tokens and trajectory windows (policy-guided diffusion's layout).

A token is ``[observation, action code, reward, done]``. The action code is
``arctanh(clip(a', ±0.999))`` with ``a'`` the action mapped affinely from the action space onto [-1, 1]
(identity for unbounded spaces), so tanh brings any sample back inside the space.

Windows hold H consecutive tokens of one episode and never cross episodes. An episode that terminates is
continued past its end by absorbing tokens (the terminal successor state, zero action code and reward,
done = 1) so windows may run into a termination; a truncated episode only yields windows that fit inside it.
Decoding a window gives up to H−1 transitions (``next_obs`` is the following token's observation); the
first token with done > 0.5 ends the segment as a terminal transition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.types import BoxSpace, Episode, Transitions

ACTION_CLIP = 0.999


@dataclass(frozen=True)
class TokenLayout:
    obs_dim: int
    act_dim: int
    act_low: np.ndarray
    act_high: np.ndarray

    @classmethod
    def for_spaces(cls, obs: BoxSpace, act: BoxSpace) -> TokenLayout:
        return cls(obs.dim, act.dim, act.low.astype(np.float64), act.high.astype(np.float64))

    @property
    def dim(self) -> int:
        return self.obs_dim + self.act_dim + 2

    @property
    def obs(self) -> slice:
        return slice(0, self.obs_dim)

    @property
    def act(self) -> slice:
        return slice(self.obs_dim, self.obs_dim + self.act_dim)

    @property
    def bounded(self) -> np.ndarray:
        return np.isfinite(self.act_low) & np.isfinite(self.act_high)

    def encode_actions(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        span = np.where(self.bounded, self.act_high - self.act_low, 2.0)
        low = np.where(self.bounded, self.act_low, -1.0)
        unit = np.where(self.bounded, 2 * (a - low) / span - 1, a)
        return np.where(self.bounded, np.arctanh(np.clip(unit, -ACTION_CLIP, ACTION_CLIP)), a)

    def decode_actions(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, np.float64)
        span = np.where(self.bounded, self.act_high - self.act_low, 2.0)
        low = np.where(self.bounded, self.act_low, -1.0)
        return np.where(self.bounded, low + (np.tanh(u) + 1) / 2 * span, u)


def episode_tokens(layout: TokenLayout, e: Episode, pad: int) -> np.ndarray:
    """(T + pad, D) tokens of one episode; a terminated episode gets ``pad`` absorbing tokens after it."""
    t = e.length
    tok = np.zeros((t, layout.dim))
    tok[:, layout.obs] = e.observations[:-1]
    tok[:, layout.act] = layout.encode_actions(e.actions)
    tok[:, -2] = e.rewards
    tok[:, -1] = e.terminations
    if not e.terminated or pad == 0:
        return tok
    absorbing = np.zeros((pad, layout.dim))
    absorbing[:, layout.obs] = e.observations[-1]
    absorbing[:, -1] = 1.0
    return np.concatenate([tok, absorbing])


def windows(layout: TokenLayout, episodes: tuple[Episode, ...], horizon: int, stride: int = 1) -> np.ndarray:
    """All H-step windows (N, H, D), float32; see the module docstring for the episode-end rules."""
    out = []
    for e in episodes:
        tok = episode_tokens(layout, e, pad=horizon - 1)
        # A terminated episode's windows may start at any real step; a truncated one's must fit inside it.
        last_start = e.length - 1 if e.terminated else e.length - horizon
        for s in range(0, last_start + 1, stride):
            out.append(tok[s : s + horizon])
    if not out:
        return np.zeros((0, horizon, layout.dim), np.float32)
    return np.stack(out).astype(np.float32)


def start_tokens(layout: TokenLayout, t: Transitions, rows: np.ndarray) -> np.ndarray:
    """Tokens (B, D) of the given dataset rows (real start states with their recorded first step)."""
    tok = np.zeros((len(rows), layout.dim))
    tok[:, layout.obs] = t.observations[rows]
    tok[:, layout.act] = layout.encode_actions(t.actions[rows])
    tok[:, -2] = t.rewards[rows]
    tok[:, -1] = t.terminals[rows]
    return tok.astype(np.float32)


def decode_window(layout: TokenLayout, w: np.ndarray) -> Episode | None:
    """One window (H, D) of raw tokens -> an episode of up to H−1 steps (``None`` if it has none)."""
    h = w.shape[0]
    done = w[:, -1] > 0.5
    ends = np.flatnonzero(done[: h - 1])
    n = int(ends[0]) + 1 if ends.size else h - 1
    if n < 1:
        return None
    return Episode.ending(
        w[: n + 1, layout.obs],
        layout.decode_actions(w[:n, layout.act]),
        w[:n, -2],
        terminated=bool(ends.size),
    )
