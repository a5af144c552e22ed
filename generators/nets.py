"""Denoiser and drafter networks.

* :class:`TemporalUNet1D` — trajectory diffusion's denoiser (Janner et al. 2022's temporal U-Net shape):
  residual 1-D conv blocks with GroupNorm, FiLM conditioning on the noise level, two resolutions down and up.
* :class:`ResidualMLP` — SynthER's denoiser (Lu et al. 2023): pre-norm residual MLP blocks.
* :class:`CausalTransformer` — the autoregressive drafter: each position attends to itself and earlier
  positions only, and :meth:`CausalTransformer.step` decodes one token at a time with a key/value cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class FourierEmbedding(nn.Module):
    """c_noise (B,) -> (B, dim) random Fourier features, then an MLP (EDM's noise embedding)."""

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.SiLU(), nn.Linear(dim * 2, dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * c[:, None] * self.freqs[None]  # type: ignore[index]
        return self.mlp(torch.cat([f.cos(), f.sin()], 1))


class ResBlock1D(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, 5, padding=2)
        self.conv2 = nn.Conv1d(c_out, c_out, 5, padding=2)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.film = nn.Linear(emb, 2 * c_out)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        scale, shift = self.film(e)[:, :, None].chunk(2, 1)
        h = h * (1 + scale) + shift
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class TemporalUNet1D(nn.Module):
    """x (B, H, D), c_noise (B,) -> (B, H, D). H must be divisible by 2^(len(channels) - 1)."""

    def __init__(self, dim: int, channels: tuple[int, ...] = (64, 128, 256), emb: int = 128) -> None:
        super().__init__()
        self.levels = len(channels)
        self.embed = FourierEmbedding(emb)
        self.inp = nn.Conv1d(dim, channels[0], 5, padding=2)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c_prev = channels[0]
        for i, c in enumerate(channels):
            self.down.append(nn.ModuleList([ResBlock1D(c_prev, c, emb), ResBlock1D(c, c, emb)]))
            self.pool.append(
                nn.Conv1d(c, c, 3, stride=2, padding=1) if i < self.levels - 1 else nn.Identity()
            )
            c_prev = c
        self.mid = nn.ModuleList([ResBlock1D(c_prev, c_prev, emb), ResBlock1D(c_prev, c_prev, emb)])
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            self.up.append(nn.ModuleList([ResBlock1D(c_prev + c, c, emb), ResBlock1D(c, c, emb)]))
            self.unpool.append(nn.ConvTranspose1d(c, c, 4, stride=2, padding=1) if i > 0 else nn.Identity())
            c_prev = c
        self.out = nn.Sequential(nn.GroupNorm(8, channels[0]), nn.SiLU(), nn.Conv1d(channels[0], dim, 1))
        last = self.out[-1]
        assert isinstance(last, nn.Conv1d | nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        e = self.embed(c_noise)
        h = self.inp(x.transpose(1, 2))
        skips = []
        for blocks, pool in zip(self.down, self.pool, strict=True):
            for b in blocks:  # type: ignore[attr-defined]
                h = b(h, e)
            skips.append(h)
            h = pool(h)
        for b in self.mid:
            h = b(h, e)
        for blocks, unpool in zip(self.up, self.unpool, strict=True):
            h = torch.cat([h, skips.pop()], 1)
            for b in blocks:  # type: ignore[attr-defined]
                h = b(h, e)
            h = unpool(h)
        return self.out(h).transpose(1, 2)


class ResidualMLP(nn.Module):
    """x (B, D), c_noise (B,) -> (B, D): SynthER's residual MLP (pre-LayerNorm blocks, noise added in)."""

    def __init__(self, dim: int, width: int = 512, depth: int = 4, emb: int = 128) -> None:
        super().__init__()
        self.embed = FourierEmbedding(emb)
        self.inp = nn.Linear(dim, width)
        self.emb_proj = nn.Linear(emb, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width)
            )
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        last = self.out[-1]
        assert isinstance(last, nn.Conv1d | nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.emb_proj(self.embed(c_noise))
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class KVCache:
    """Keys and values of the positions decoded so far, preallocated to ``max_len`` (B, T, heads, d_head).

    Writing in place keeps one decoding step O(T): growing the cache by concatenation copies it every step.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new positions (B, n, heads, d_head); returns all keys and values so far."""
        if self.k is None or self.v is None:
            b, _, h, d = k.shape
            self.k = k.new_empty(b, self.max_len, h, d)
            self.v = v.new_empty(b, self.max_len, h, d)
        end = self.length + k.shape[1]
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class CausalBlock(nn.Module):
    """Pre-norm transformer block; ``kv_heads`` < ``heads`` shares each key/value head among
    heads / kv_heads query heads (grouped-query attention; 1 is multi-query attention)."""

    def __init__(self, width: int, heads: int, kv_heads: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        kv = heads if kv_heads is None else kv_heads
        if width % heads or kv < 1 or heads % kv:
            raise ValueError(
                f"width {width}, heads {heads}, kv_heads {kv}: need heads | width, kv_heads | heads"
            )
        self.heads, self.kv_heads = heads, kv
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, width + 2 * kv * (width // heads))
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, W). With ``cache`` (earlier positions, updated in place), x holds the new ones."""
        b, t, w = x.shape
        h, kv = self.heads, self.kv_heads
        d = w // h
        q, k, v = self.qkv(self.norm1(x)).split([w, kv * d, kv * d], -1)
        q, k, v = q.view(b, t, h, d), k.view(b, t, kv, d), v.view(b, t, kv, d)
        scale = d**-0.5
        if cache is None:
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=kv < h
            ).transpose(1, 2)
        elif t == 1 and kv == h:
            # Decoding one position: it attends to every cached one. Broadcast products over the cache
            # (B, T, heads, d) beat B·heads tiny matrix products and need no transposed copies.
            k, v = cache.append(k, v)
            weights = ((q * k).sum(-1) * scale).softmax(1)  # (B, T, heads)
            att = (weights.unsqueeze(-1) * v).sum(1, keepdim=True)
        elif t == 1:
            # Grouped: each key/value head serves heads/kv query heads, so one (heads/kv × d)·(d × T)
            # product per sample and group reads the cache once — a quarter of the multi-head memory
            # traffic at kv = heads/4, which is what decoding on a CPU is bound by.
            k, v = cache.append(k, v)
            qg = q.reshape(b, kv, h // kv, d)
            weights = (torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale).softmax(-1)  # (B, kv, g, T)
            att = torch.matmul(weights, v.permute(0, 2, 1, 3)).reshape(b, 1, h, d)
        else:
            # Several new positions see the cache and each other causally (mask offset by the cache).
            k, v = cache.append(k, v)
            k, v = k.repeat_interleave(h // kv, 2), v.repeat_interleave(h // kv, 2)
            n_all = k.shape[1]
            mask = torch.ones(t, n_all, dtype=torch.bool, device=x.device).tril(n_all - t)
            scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale
            att = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
        x = x + self.proj(att.reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """tokens (B, T, D) -> per-position Gaussian over the next token: mean, logvar (B, T, D)."""

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        heads: int = 4,
        max_len: int = 64,
        kv_heads: int | None = None,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.inp = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(CausalBlock(width, heads, kv_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2 * dim)

    def _run(
        self, x: torch.Tensor, offset: int, caches: list[KVCache] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if offset + x.shape[1] > self.max_len:
            raise ValueError(f"sequence of {offset + x.shape[1]} tokens exceeds max_len {self.max_len}")
        h = self.inp(x) + self.pos[:, offset : offset + x.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i])
        mean, logvar = self.head(self.norm(h)).chunk(2, -1)
        return mean, logvar.clamp(-12.0, 4.0)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(tokens, 0, None)

    def new_cache(self) -> list[KVCache]:
        return [KVCache(self.max_len) for _ in self.blocks]

    def step(
        self, token: torch.Tensor, position: int, caches: list[KVCache]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token (B, 1, D) at ``position``; returns the next-token Gaussian (B, 1, D) twice."""
        return self._run(token, position, caches)
