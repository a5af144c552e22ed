"""Benchmark helpers: the FLOP count of network operations against closed forms, the matmul peak."""

from __future__ import annotations

import time

import pytest
import torch

from rlsynth.pipeline.bench_report import chunk_transitions, marginal_speed, matmul_gflops, network_flops


def test_network_flops_count_products_and_convolutions_in_closed_form() -> None:
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    assert network_flops(lambda: lin(x)) == 2 * 5 * 8 * 4
    conv = torch.nn.Conv1d(3, 6, kernel_size=5, padding=2)
    y = torch.randn(2, 3, 32)
    # Each of the 2 × 6 × 32 outputs is a dot product of 3 × 5 terms.
    assert network_flops(lambda: conv(y)) == 2 * (2 * 6 * 32) * (3 * 5)
    # Elementwise work is not counted: the share of peak is the share spent in network products.
    assert network_flops(lambda: torch.tanh(x) * 2 + 1) == 0


def test_matmul_gflops_measures_on_the_threads_asked_and_restores_them() -> None:
    before = torch.get_num_threads()
    assert matmul_gflops() > 0 and matmul_gflops(threads=1) > 0
    assert torch.get_num_threads() == before


def test_marginal_speed_cancels_fixed_costs_and_counts_flops_per_marginal_transition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = {"t": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    weight = torch.randn(4, 4)

    def run(m: int) -> int:
        clock["t"] += 5.0 + m / 100.0  # 5 s of start-up, then 100 transitions/s
        torch.randn(m + 7, 4) @ weight  # (m + 7) rows of 2·4·4 FLOPs: 7 rows are a fixed cost
        return m

    out, speed = marginal_speed(run, 100, 500, repeats=3)
    assert out == 500
    assert speed.rate == pytest.approx(100.0)
    assert speed.flops_per_transition == 2 * 4 * 4
    assert speed.gflops == pytest.approx(100.0 * 32 / 1e9)
    assert speed.share(speed.gflops * 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="need 0 < small < n"):
        marginal_speed(run, 500, 500, repeats=1)


def test_chunk_transitions_are_whole_cold_chunks_of_windows() -> None:
    from rlsynth.generators.sampling import CHUNKS

    assert chunk_transitions("trajectory") == CHUNKS["trajectory"] * 31
    assert chunk_transitions("autoregressive", 2) == 2 * CHUNKS["autoregressive"] * 31
