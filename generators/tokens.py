"""Per-step tokens and trajectory windows (policy-guided diffusion's layout).

A token is ``[observation, action code, reward, done]``. The action code is
``arctanh(clip(a', ±0.999))`` with ``a'`` the action mapped affinely from the action space onto [-1, 1]
(identity for unbounded spaces), so tanh brings any sample back inside the space.

Windows hold H consecutive tokens of one episode and never cross episodes. An episode that terminates is
continued past its end by absorbing tokens (the terminal successor state, zero action code and reward,
done = 1) so windows may run into a termination; a truncated episode only yields windows that fit inside it.
Decoding a window gives up to H−1 transitions (``next_obs`` is the following token's observation); the
first token with done > 0.5 ends the segment as a terminal transition.

Training does not hold the windows themselves (H copies of every token, with float64 copies while they
were normalised: a peak of 10 KB per Hopper transition at H = 32): a :class:`WindowStore` keeps each token
once, in one flat array with every episode's padding, and gathers a batch of windows by their start rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlsynth.datasets.scratch import scratch_array
from rlsynth.datasets.types import BoxSpace, Episode, Transitions, episodes_to_transitions
from rlsynth.generators.checkpoint import BLOCK_ROWS, Normaliser, column_moments

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

    @property
    def span(self) -> np.ndarray:
        """Width of each action dimension's interval (2 for unbounded ones: the identity map's [-1, 1])."""
        return np.where(self.bounded, self.act_high - self.act_low, 2.0)

    @property
    def low(self) -> np.ndarray:
        """Lower end of each action dimension's interval (-1 for unbounded ones)."""
        return np.where(self.bounded, self.act_low, -1.0)

    def encode_actions(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        span, low = self.span, self.low
        unit = np.where(self.bounded, 2 * (a - low) / span - 1, a)
        return np.where(self.bounded, np.arctanh(np.clip(unit, -ACTION_CLIP, ACTION_CLIP)), a)

    def decode_actions(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, np.float64)
        span, low = self.span, self.low
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
    """All H-step windows (N, H, D), float32, materialised (small data only: training uses
    :class:`WindowStore`); see the module docstring for the episode-end rules."""
    if not episodes:
        return np.zeros((0, horizon, layout.dim), np.float32)
    flat = flat_tokens(layout, episodes_to_transitions(episodes), horizon, stride)
    return flat.tokens[flat.starts[:, None] + np.arange(horizon)]


@dataclass(frozen=True)
class FlatTokens:
    """Every episode's raw tokens back to back, a terminated episode followed by its H−1 absorbing tokens,
    and the first row of every H-step window (episodes in order, starts ascending: the order
    :func:`windows` lists them in). Shapes: tokens (M, D) float32, starts (N,) int64."""

    tokens: np.ndarray
    starts: np.ndarray
    horizon: int

    def window_counts(self) -> np.ndarray:
        """How many windows hold each token row (M,), int32: what every token weighs when statistics are
        taken over the windows. Four bytes a row and no index temporaries: beside a table larger than
        memory, these per-row arrays are what a training stage holds."""
        edges = np.zeros(len(self.tokens) + 1, np.int32)
        # Starts are distinct, and so are the ends: plain fancy-index updates count each once. The ends
        # are indexed through a shifted view, so no array of start + H is built.
        edges[self.starts] += 1
        edges[self.horizon :][self.starts] -= 1
        np.cumsum(edges, out=edges)
        return edges[:-1]


def flat_tokens(layout: TokenLayout, t: Transitions, horizon: int, stride: int = 1) -> FlatTokens:
    """The tokens of ``t``'s episodes and their window starts, built from the columns in blocks (no
    per-row Python, no per-episode copies); the values equal :func:`episode_tokens` cast to float32."""
    if horizon < 1 or stride < 1:
        raise ValueError(f"horizon and stride must be >= 1, got {horizon} and {stride}")
    bounds = t.episode_bounds()
    lengths = np.diff(bounds)
    terminated = t.terminals[bounds[1:] - 1].astype(bool) if len(lengths) else np.zeros(0, bool)
    pad = (horizon - 1) * terminated.astype(np.int64)
    # An episode's first token row: its first transition's row plus the padding of the episodes before it.
    first = bounds[:-1] + np.cumsum(pad) - pad
    starts = _window_starts(first, lengths, terminated, horizon, stride)
    tokens = scratch_array((len(t) + int(pad.sum()), layout.dim), np.float32)
    _fill_steps(layout, tokens, t, np.repeat(first - bounds[:-1], lengths))
    _absorb(
        layout,
        tokens,
        t.next_observations[bounds[1:][terminated] - 1],
        (first + lengths)[terminated],
        horizon,
    )
    return FlatTokens(tokens, starts, horizon)


def _fill_steps(layout: TokenLayout, tokens: np.ndarray, t: Transitions, shift: np.ndarray) -> None:
    """Write every transition's token at its row plus ``shift`` (the padding before its episode)."""
    for lo in range(0, len(t), BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, len(t))
        tokens[np.arange(lo, hi) + shift[lo:hi]] = _step_tokens(layout, t, lo, hi)


def _step_tokens(layout: TokenLayout, t: Transitions, lo: int, hi: int) -> np.ndarray:
    """Tokens of rows lo..hi-1 in float64, as :func:`episode_tokens` builds them, so their float32 cast
    matches it."""
    tok = np.zeros((hi - lo, layout.dim))
    tok[:, layout.obs] = t.observations[lo:hi]
    tok[:, layout.act] = layout.encode_actions(t.actions[lo:hi])
    tok[:, -2] = t.rewards[lo:hi]
    tok[:, -1] = t.terminals[lo:hi]
    return tok


def _absorb(
    layout: TokenLayout, tokens: np.ndarray, last_obs: np.ndarray, at: np.ndarray, horizon: int
) -> None:
    """Write H−1 absorbing tokens (the terminal successor state, done = 1) from each row of ``at``."""
    if horizon == 1 or not len(at):
        return
    rows = at[:, None] + np.arange(horizon - 1)
    tokens[rows, layout.obs] = last_obs[:, None, :]
    tokens[rows, -1] = 1.0


def _window_starts(
    first: np.ndarray, lengths: np.ndarray, terminated: np.ndarray, horizon: int, stride: int
) -> np.ndarray:
    """Start rows of every window: a terminated episode's may start at any real step, a truncated one's
    must fit inside it."""
    last = np.where(terminated, lengths - 1, lengths - horizon)
    count = np.where(last >= 0, last // stride + 1, 0)
    before = np.cumsum(count) - count
    # Window j, the k-th of its episode (k = j − before), starts at first + stride·k.
    starts = np.repeat(first - stride * before, count)
    starts += np.arange(0, stride * len(starts), stride, dtype=np.int64)
    return starts


def window_normaliser(flat: FlatTokens, floor: float = 1e-6) -> Normaliser:
    """The statistics ``Normaliser.fit`` takes over all windows' tokens, from each token weighted by the
    number of windows holding it (float64 sums in blocks), without building the windows."""
    w = flat.window_counts()
    total = w.sum()
    mean = np.zeros(flat.tokens.shape[1])
    for lo in range(0, len(w), BLOCK_ROWS):
        mean += w[lo : lo + BLOCK_ROWS] @ flat.tokens[lo : lo + BLOCK_ROWS].astype(np.float64)
    mean /= total
    var = np.zeros_like(mean)
    for lo in range(0, len(w), BLOCK_ROWS):
        d = flat.tokens[lo : lo + BLOCK_ROWS].astype(np.float64)
        d -= mean
        var += w[lo : lo + BLOCK_ROWS] @ np.square(d, out=d)
    std = np.sqrt(var / total)
    return Normaliser(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32))


@dataclass(frozen=True)
class WindowStore:
    """H-step windows gathered by index from one flat array of normalised tokens: window i is
    ``tokens[starts[i] : starts[i] + H]``. Memory is the tokens once, not H times; a batch of B windows
    costs B·H rows to gather. Shapes: tokens (M, D) float32, starts (N,) int64."""

    tokens: torch.Tensor
    starts: torch.Tensor
    horizon: int

    @classmethod
    def normalised(cls, flat: FlatTokens, norm: Normaliser) -> WindowStore:
        """The store of ``flat``'s windows under ``norm``; ``flat.tokens`` is normalised in place (the
        raw tokens are not kept: a second copy is what the store exists to avoid)."""
        x = torch.from_numpy(flat.tokens)
        # The same float32 operations as Normaliser.normalise, so the values match it bit for bit.
        x.sub_(torch.as_tensor(norm.mean)).div_(torch.as_tensor(norm.std))
        return cls(x, torch.from_numpy(flat.starts), flat.horizon)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def index(self, idx: torch.Tensor) -> torch.Tensor:
        """Windows (B, H, D) of the window indices ``idx`` (B,)."""
        return self.tokens[self.starts[idx].unsqueeze(-1) + torch.arange(self.horizon)]


def step_scales(layout: TokenLayout, std: np.ndarray, t: Transitions, alpha: float) -> np.ndarray:
    """Token scales that resolve slow observation dimensions: std^(1−α)·std_Δ^α where std_Δ < std.

    A dimension that moves little per step (a body height, a root angle) changes by a small fraction of
    its spread, so under plain z-scoring its step-to-step structure sits at noise levels the denoiser
    rarely trains on, and the sample's dynamics there are imprecise. Scaling it by (a power of) the std of
    its one-step change puts that structure at unit scale. Other tokens keep ``std``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"step_scale must be in [0, 1], got {alpha}")
    out = np.asarray(std, np.float64).copy()
    delta = column_moments(len(t), t.one_step_change)[1]
    obs_std = out[layout.obs]
    slow = delta < obs_std
    obs_std[slow] = obs_std[slow] ** (1 - alpha) * np.maximum(delta[slow], 1e-6) ** alpha
    out[layout.obs] = obs_std
    return out.astype(np.float32)


def start_tokens(layout: TokenLayout, t: Transitions, rows: np.ndarray) -> np.ndarray:
    """Tokens (B, D) of the given dataset rows (real start states with their recorded first step)."""
    tok = np.zeros((len(rows), layout.dim))
    tok[:, layout.obs] = t.observations[rows]
    tok[:, layout.act] = layout.encode_actions(t.actions[rows])
    tok[:, -2] = t.rewards[rows]
    tok[:, -1] = t.terminals[rows]
    return tok.astype(np.float32)


def decode_windows(layout: TokenLayout, raw: np.ndarray) -> tuple[Transitions, np.ndarray]:
    """Windows (B, H, D) of raw tokens -> their episodes as one columnar block (episode j from window
    ``idx[j]``, ids 0..k−1) and those indices ``idx`` (windows with no step are dropped).

    A window's episode runs to its first token with done > 0.5 among the first H − 1 (a terminal step) or
    else over all H − 1 steps (truncated). All windows are cut at once by a step mask: a Python ``Episode``
    per window cost more than the decoding itself at a fast sampler's rate.
    """
    length, terminated = _window_lengths(raw)
    kept = np.flatnonzero(length > 0)
    # Row-major: every kept step of window 0, then of window 1, ... (the episodes' order and step order).
    window, step = np.nonzero(np.arange(raw.shape[1] - 1)[None, :] < length[:, None])
    last = step == length[window] - 1
    tokens = raw[window, step]  # (N, D): one gather of every kept step's token
    block = Transitions(
        episode_id=np.repeat(np.arange(len(kept), dtype=np.int64), length[kept]),
        step=step.astype(np.int32),
        observations=np.ascontiguousarray(tokens[:, layout.obs], np.float32),
        # Decoded elementwise, so each value is what decoding its whole window gave.
        actions=np.ascontiguousarray(layout.decode_actions(tokens[:, layout.act]), np.float32),
        rewards=np.ascontiguousarray(tokens[:, -2], np.float32),
        next_observations=np.ascontiguousarray(raw[window, step + 1][:, layout.obs], np.float32),
        terminals=last & terminated[window],
        timeouts=last & ~terminated[window],
    )
    return block, kept.astype(np.int64)


def _window_lengths(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each window's step count (B,) and whether its last step is terminal (B,)."""
    steps = max(raw.shape[1] - 1, 0)
    done = raw[:, :steps, -1] > 0.5
    terminated: np.ndarray = np.asarray(done.any(1))
    if steps == 0:  # argmax refuses an empty axis; such windows have no step at all
        return np.zeros(len(raw), np.int64), terminated
    # argmax finds the first done step; windows with none run their whole H − 1 steps.
    return np.where(terminated, done.argmax(1) + 1, steps).astype(np.int64), terminated


@dataclass(frozen=True)
class Steps:
    """Environment quantities of B samples of T steps, differentiable in the normalised sample.

    ``obs``/``next_obs`` (B, T, o), ``act`` (B, T, a) in the action space's units, ``reward`` (B, T),
    ``valid`` (B, T) 1 for real steps (before a window's first terminal and its absorbing padding), 0 after.
    """

    obs: torch.Tensor
    act: torch.Tensor
    next_obs: torch.Tensor
    reward: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class TokenCodec:
    """Reads normalised generator samples as environment steps, differentiably (what guidance needs).

    ``form`` is ``"window"`` for (B, H, D) token windows (H−1 steps: the last token only gives the
    previous step's next observation) or ``"transition"`` for (B, F) transition features
    ``[obs, action code, reward, next_obs, done]`` (one step each).
    """

    layout: TokenLayout
    mean: np.ndarray
    std: np.ndarray
    form: str

    def __post_init__(self) -> None:
        if self.form not in ("window", "transition"):
            raise ValueError(f"unknown sample form {self.form!r}")

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.as_tensor(self.std, device=x.device) + torch.as_tensor(self.mean, device=x.device)

    def decode_actions(self, u: torch.Tensor) -> torch.Tensor:
        """Torch twin of :meth:`TokenLayout.decode_actions`."""
        lay = self.layout
        bounded = torch.as_tensor(lay.bounded, device=u.device)
        low = torch.as_tensor(lay.low, dtype=u.dtype, device=u.device)
        span = torch.as_tensor(lay.span, dtype=u.dtype, device=u.device)
        return torch.where(bounded, low + (torch.tanh(u) + 1) / 2 * span, u)

    def steps(self, x: torch.Tensor) -> Steps:
        lay, r = self.layout, self.raw(x)
        if self.form == "transition":
            o, a = lay.obs_dim, lay.act_dim
            one = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
            return Steps(
                obs=r[:, None, :o],
                act=self.decode_actions(r[:, None, o : o + a]),
                next_obs=r[:, None, o + a + 1 : o + a + 1 + o],
                reward=r[:, None, o + a],
                valid=one,
            )
        done = (r[:, :-1, -1] > 0.5).to(x.dtype).detach()
        # Step t is real while no earlier token was done (the terminal step itself is real).
        before = torch.cat([torch.zeros_like(done[:, :1]), done[:, :-1]], 1)
        valid = (torch.cumsum(before, 1) == 0).to(x.dtype)
        return Steps(
            obs=r[:, :-1, lay.obs],
            act=self.decode_actions(r[:, :-1, lay.act]),
            next_obs=r[:, 1:, lay.obs],
            reward=r[:, :-1, -2],
            valid=valid,
        )

    def mask(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """1 on the entries of ``x`` holding ``part`` ("act" or "obs_act"), 0 elsewhere; shape of x[0]."""
        lay = self.layout
        m = torch.zeros(x.shape[-1], device=x.device, dtype=x.dtype)
        if part not in ("act", "obs_act"):
            raise ValueError(f"unknown part {part!r}")
        m[lay.act] = 1
        if part == "obs_act":
            m[lay.obs] = 1
            if self.form == "transition":
                m[lay.obs_dim + lay.act_dim + 1 : 2 * lay.obs_dim + lay.act_dim + 1] = 1
        return m.expand_as(x[0]).clone()
