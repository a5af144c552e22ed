"""``rlsynth agent ...``: train and score d3rlpy agents on dataset versions."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from rlsynth.generators.options import Regeneration, SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.pipeline.cli_common import catalog_option, echo_json, json_option, open_catalog
from rlsynth.pipeline.cli_options import from_params, group_options


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


@agent.command("pgd")
@click.option(
    "--generator",
    "generator_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Trained diffusion generator (trajectory, transition, or a drafter with a refiner).",
)
@click.option("--data", "data_ref", required=True, help="Real data: NAME@N, a file or minari:<id>.")
@click.option("--name", required=True, help="Catalog name of the regenerated synthetic versions.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Run folder (agents, final agent)."
)
@click.option("--algo", type=click.Choice(["iql", "td3bc", "cql", "bc"]), default="td3bc", show_default=True)
@click.option("--agent-steps", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Agent gradient steps in total.")  # fmt: skip
@click.option("--regenerate-every", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Agent steps between regenerations (one round each).")  # fmt: skip
@click.option("--transitions", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Synthetic transitions per round.")  # fmt: skip
@click.option("--initial-target", default=None, type=click.Path(dir_okay=False),
              help="Agent (.d3) guiding round 0 (default: round 0 unguided).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@group_options(SamplerSettings)
@group_options(Regeneration)
# The loop guides every round by its own agent: the target and the term are its to fill in.
@group_options(GuidanceConfig, skip=("policy", "terms"))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@catalog_option
@json_option
@click.pass_context
def agent_pgd_cmd(
    ctx: click.Context,
    generator_dir: str,
    data_ref: str,
    name: str,
    out: str,
    algo: str,
    agent_steps: int,
    regenerate_every: int,
    transitions: int,
    initial_target: str | None,
    seed: int,
    quiet: bool,
    catalog_uri: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """The policy-guided diffusion loop: train an agent on synthetic + real batches, regenerating the
    synthetic set for the current agent every --regenerate-every steps (cold, or --regenerate warm)."""
    from rlsynth.datasets.catalog import check_name
    from rlsynth.datasets.sources import load_source, source_lineage
    from rlsynth.generators.api import load_generator
    from rlsynth.offline_rl.pgd import PGDConfig, run_pgd

    cfg = PGDConfig(
        algo=algo,
        steps=agent_steps,
        regenerate_every=regenerate_every,
        synthetic_transitions=transitions,
        guidance=from_params(GuidanceConfig, options, terms=("policy",)),
        initial_target=initial_target,
        sampler=from_params(SamplerSettings, options),
        regeneration=from_params(Regeneration, options),
        seed=seed,
    )
    check_name(name)
    cat = open_catalog(ctx, catalog_uri)
    gen = load_generator(generator_dir)
    real = load_source(data_ref, cat)
    res = run_pgd(
        cfg,
        gen,
        real,
        cat,
        name,
        Path(out),
        real_lineage=source_lineage(data_ref, real, cat),
        progress=not quiet,
    )
    rounds = [asdict(r) for r in res.rounds]
    if as_json:
        echo_json({"agent": str(res.agent.resolve()), "rounds": rounds})
        return
    for r in res.rounds:
        how = "cold" if r.sigma_start is None else f"warm from σ {r.sigma_start:g}"
        click.echo(f"round {r.round}: {r.version} ({how}, sampled in {r.sample_seconds:.1f}s)")
    click.echo(f"agent: {res.agent.resolve()}")


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
