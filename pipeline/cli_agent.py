"""``rlsynth agent ...``: train and score d3rlpy agents on dataset versions."""

from __future__ import annotations

import math
from pathlib import Path

import click

from rlsynth.pipeline.cli_common import catalog_option, echo_json, json_option, open_catalog


@click.group()
def agent() -> None:
    """Offline-RL agents (d3rlpy): train them on catalog data; they are guidance targets and baselines."""


@agent.command("train")
@click.option("--algo", type=click.Choice(["iql", "td3bc", "cql", "bc"]), required=True)
@click.option(
    "--data",
    "data_refs",
    required=True,
    multiple=True,
    help="Training data: NAME@N, a file or minari:<id>; repeat for a union (uniform over all rows).",
)
@click.option(
    "--mix",
    "mixes",
    multiple=True,
    metavar="NAME@N:ROWS",
    help="Also draw exactly ROWS rows of every batch from this dataset (repeatable); --data fills the rest "
    "of the batch. E.g. --data synth@1 --mix real@1:16 gives 240 + 16 with batch 256.",
)
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Gradient steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Agent file to write (.d3).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@catalog_option
@json_option
@click.pass_context
def agent_train_cmd(
    ctx: click.Context,
    algo: str,
    data_refs: tuple[str, ...],
    mixes: tuple[str, ...],
    steps: int,
    seed: int,
    batch_size: int,
    out: str,
    quiet: bool,
    catalog_uri: str | None,
    as_json: bool,
) -> None:
    """Train a d3rlpy agent with the published hyperparameters; writes AGENT.d3 and AGENT.d3.json."""
    from rlsynth.datasets.sources import load_source, source_lineage
    from rlsynth.offline_rl.mixture import Mixture
    from rlsynth.offline_rl.train import check_out_path, train_agent

    check_out_path(Path(out))
    parsed = [_parse_mix(m) for m in mixes]
    rest = batch_size - sum(rows for _, rows in parsed)
    if rest < 1:
        raise click.BadParameter(
            f"mix rows add up to {batch_size - rest}; --data needs at least one of the {batch_size} rows",
            param_hint="--mix",
        )
    cat = open_catalog(ctx, catalog_uri)
    main_sets = [load_source(r, cat) for r in data_refs]
    mix_sets = [(load_source(r, cat), rows) for r, rows in parsed]
    lineage = {
        "data": [source_lineage(r, d, cat) for r, d in zip(data_refs, main_sets, strict=True)],
        "mix": [
            {**source_lineage(r, d, cat), "rows_per_batch": rows}
            for (r, _), (d, rows) in zip(parsed, mix_sets, strict=True)
        ],
    }
    mixture = Mixture.filled(main_sets, mix_sets, batch_size)
    run = train_agent(
        algo,
        mixture,
        Path(out),
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        progress=not quiet,
        lineage=lineage,
    )
    result = {
        "out": str(run.path.resolve()),
        "algo": algo,
        "steps": steps,
        "seed": seed,
        "seconds": run.seconds,
        "mixture": mixture.describe(),
    }
    if as_json:
        echo_json(result)
    else:
        click.echo(f"trained {algo} for {steps} steps in {run.seconds:.0f}s: {result['out']}")


def _parse_mix(spec: str) -> tuple[str, int]:
    ref, sep, rows = spec.rpartition(":")
    if not sep or not ref or not rows.isdigit() or int(rows) < 1:
        raise click.BadParameter(
            f"{spec!r} is not NAME@N:ROWS with ROWS a positive integer", param_hint="--mix"
        )
    return ref, int(rows)


@agent.command("eval")
@click.argument("agent_path", metavar="AGENT.d3", type=click.Path(dir_okay=False))
@click.option(
    "--env", "env_id", default=None, help="Gymnasium id (default: the one recorded with the agent)."
)
@click.option("--episodes", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Episode i resets with seed + i.")
@click.option("--ref-min", type=float, default=None, help="Random-policy return for the normalised score.")
@click.option("--ref-max", type=float, default=None, help="Expert return for the normalised score.")
@json_option
def agent_eval_cmd(
    agent_path: str,
    env_id: str | None,
    episodes: int,
    seed: int,
    ref_min: float | None,
    ref_max: float | None,
    as_json: bool,
) -> None:
    """Score an agent in its environment: return mean ± std and the D4RL-normalised score."""
    from rlsynth.datasets.agents import check_agent_spaces, load_agent, recorded_env_id
    from rlsynth.datasets.envs import env_info
    from rlsynth.datasets.types import check_env_id
    from rlsynth.offline_rl.evaluate import Reference, evaluate_agent

    path = Path(agent_path)
    if env_id is not None:
        check_env_id(env_id, "--env")
    algo = load_agent(path)
    if env_id is None:
        env_id = recorded_env_id(path)
        if env_id is None:
            raise click.BadParameter(
                "no environment recorded with this agent; pass --env", param_hint="--env"
            )
    info = env_info(env_id)
    check_agent_spaces(algo, info.observation_space.dim, info.action_space.dim, env_id)
    given = [v for v in (ref_min, ref_max) if v is not None]
    if len(given) == 1 or (given and (ref_min == ref_max or not all(math.isfinite(v) for v in given))):
        raise click.BadParameter(
            "give both --ref-min and --ref-max, finite and different", param_hint="--ref-min"
        )
    ref = Reference(ref_min, ref_max, "command line") if ref_min is not None and ref_max is not None else None
    res = evaluate_agent(algo, env_id, episodes=episodes, seed=seed, reference=ref)
    if as_json:
        echo_json(res.to_json())
        return
    line = f"{env_id}: return {res.return_mean:.1f} ± {res.return_std:.1f} over {episodes} episodes"
    if res.score_mean is not None:
        line += f"; normalised score {res.score_mean:.1f} ± {res.score_std:.1f}"
    click.echo(line)
