"""The run report: fidelity beside the linear yardstick, an honest caveat for small agent comparisons, and
image links that resolve from the report's own folder."""

from __future__ import annotations

from pathlib import Path

from rlsynth.pipeline.config import AgentsConfig, RunConfig, SourceConfig
from rlsynth.pipeline.run import agents_caveat, fidelity_lines, write_report


def _cfg(seeds: tuple[int, ...], steps: int) -> RunConfig:
    return RunConfig(source=SourceConfig(recipe="random"), agents=AgentsConfig(seeds=seeds, steps=steps))


def test_fidelity_is_set_beside_the_linear_yardstick() -> None:
    assert "below the cheapest model" in fidelity_lines({"one_step": 0.05, "linear": 0.1})[0]
    assert "0.50×" in fidelity_lines({"one_step": 0.05, "linear": 0.1})[0]
    assert "not below" in fidelity_lines({"one_step": 0.3, "linear": 0.1})[0]
    assert fidelity_lines({"one_step": 0.3}) == ["One-step normalised next-observation MSE: 0.3"]


def test_small_agent_comparisons_say_they_cannot_rank_the_data() -> None:
    assert "cannot rank the data" in agents_caveat(_cfg((0,), 1000))[0]
    assert "cannot rank the data" in agents_caveat(_cfg((0, 1, 2), 1000))[0]
    assert agents_caveat(_cfg((0, 1, 2), 20_000)) == []


def test_report_links_images_relative_to_itself(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    (run / "fidelity").mkdir(parents=True)
    stages = {
        "source": {"ref": "s@1", "content_hash": "h1"},
        "synthesize": {"ref": "y@1", "content_hash": "h2", "rows": 10, "task_seconds": 1.0},
        "target": {"agent": "a.d3"},
        "generator": {"folder": "g"},
        "fidelity": {"one_step": 0.2, "linear": 0.1, "png": str(run / "fidelity" / "fidelity.png")},
        "agents": {"table": "| t |", "curves": str(run / "agents" / "curves.png")},
    }
    text = write_report(run, _cfg((0,), 1000), {"stages": stages}).read_text()
    assert "![fidelity](fidelity/fidelity.png)" in text
    assert "![learning curves](agents/curves.png)" in text
    assert "cannot rank the data" in text and "not below" in text
