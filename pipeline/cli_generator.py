"""``rlsynth generator ...``: train generators and sample synthetic versions from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.options import SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.pipeline.cli_common import (
    GENERATOR_KINDS,
    catalog_option,
    echo_json,
    json_option,
    open_catalog,
    report_version,
)
from rlsynth.pipeline.cli_options import from_params, group_options


@click.group()
def generator() -> None:
    """Train generative models of a dataset and sample new versions from them."""


@generator.command("train")
@click.option("--data", "data_ref", required=True, help="Training data: NAME@N (or any import source).")
@click.option("--kind", type=click.Choice(list(GENERATOR_KINDS)), required=True, help="Generator family.")
@click.option(
    "--preset", "preset_name", default="cpu-small", show_default=True, help="cpu-small or gpu-paper."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Checkpoint folder (resumes if it holds an unfinished run of the same config).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Train exactly this many gradient steps (default: the preset's; with --budget-minutes, the cap).",
)
@click.option(
    "--budget-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Plan the steps that fit this wall-clock budget on this machine instead of a fixed count (the "
    "weights then depend on the machine; recorded in lineage). Cap: --steps, else 10x the preset's steps.",
)
@click.option("--seed", type=int, default=None, help="Override the preset's seed.")
@click.option(
    "--refiner",
    default=None,
    type=click.Path(file_okay=False),
    help="autoregressive: the trajectory model that refines drafts (recorded for sampling).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@catalog_option
@json_option
@click.pass_context
def generator_train_cmd(
    ctx: click.Context,
    data_ref: str,
    kind: str,
    preset_name: str,
    out: str,
    steps: int | None,
    budget_minutes: float | None,
    seed: int | None,
    refiner: str | None,
    quiet: bool,
    catalog_uri: str | None,
    as_json: bool,
) -> None:
    """Train a generator of KIND on a dataset; checkpoints are safetensors + JSON."""
    from rlsynth.datasets.sources import load_source, source_lineage
    from rlsynth.generators.api import load_generator, preset, train_generator

    preset(kind, preset_name)
    if refiner is not None:
        if kind != "autoregressive":
            raise click.BadParameter("only the autoregressive kind takes a refiner", param_hint="--refiner")
        load_generator(refiner, device="cpu")  # fail before training if it cannot be used
    cat = open_catalog(ctx, catalog_uri)
    ds = load_source(data_ref, cat)
    res = train_generator(
        kind,
        ds,
        Path(out),
        preset_name=preset_name,
        steps=steps,
        budget_s=None if budget_minutes is None else 60.0 * budget_minutes,
        seed=seed,
        progress=not quiet,
        source=source_lineage(data_ref, ds, cat),
        refiner=None if refiner is None else Path(refiner),
    )
    summary_ = {
        "out": str(Path(out).resolve()),
        "kind": kind,
        "preset": preset_name,
        "steps": res.steps,
        "seconds": res.seconds,
        "final_loss": res.final_loss,
        "val_loss": res.val_loss,
        "resumed_from": res.resumed_from,
    }
    if as_json:
        echo_json(summary_)
    else:
        click.echo(
            f"trained {kind} ({preset_name}) for {res.steps} steps in {res.seconds:.0f}s: "
            f"validation loss {res.val_loss:.4f}; checkpoint {summary_['out']}"
        )


@generator.command("sample")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--n-transitions", type=click.IntRange(min=1), required=True)
@click.option("--name", required=True, help="Catalog name of the new version.")
@click.option("--seed", type=int, default=0, show_default=True)
@group_options(SamplerSettings)
@click.option(
    "--refiner",
    default=None,
    type=click.Path(file_okay=False),
    help="autoregressive: trajectory model refining the drafts (default: the one recorded).",
)
@click.option(
    "--policy",
    "policy_spec",
    default="data",
    show_default=True,
    help="world-model: 'data' replays the dataset's actions, or a d3rlpy agent (.d3) acting "
    "deterministically; diffusion kinds and drafts: the target agent of --guidance policy.",
)
@click.option(
    "--data", "data_ref", default=None, help="Start states from this dataset (default: the training data)."
)
# --policy is GuidanceConfig.policy too: one flag for the agent, whichever way it steers the samples.
@group_options(GuidanceConfig, skip=("policy",))
@catalog_option
@json_option
@click.pass_context
def generator_sample_cmd(
    ctx: click.Context,
    folder: str,
    n_transitions: int,
    name: str,
    seed: int,
    refiner: str | None,
    policy_spec: str,
    data_ref: str | None,
    catalog_uri: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Sample a new catalog version from a trained generator, with full lineage.

    Diffusion kinds (trajectory, transition) and autoregressive drafts take --guidance terms; world-model
    rollouts take --policy as the acting agent."""
    from rlsynth.datasets.catalog import check_name
    from rlsynth.datasets.sources import load_source, source_lineage
    from rlsynth.generators.api import load_generator
    from rlsynth.offline_rl.synthesis import plan_synthesis

    settings = from_params(SamplerSettings, options)
    check_name(name)
    cat = open_catalog(ctx, catalog_uri)
    gen = load_generator(folder)
    diffused = gen.kind != "world-model"
    agent = policy_spec if diffused and policy_spec != "data" else None
    gcfg = from_params(GuidanceConfig, options, policy=agent)
    if diffused and policy_spec != "data" and "policy" not in gcfg.terms:
        raise click.BadParameter(
            "diffusion samples follow a target agent only through --guidance policy", param_hint="--policy"
        )
    if not diffused and gcfg.terms:
        raise click.BadParameter(
            "world-model rollouts are steered by --policy (the agent acts), not by guidance",
            param_hint="--guidance",
        )
    src = gen.config["data"].get("source", {})
    ref = data_ref or src.get("ref") or src.get("source")
    if not isinstance(ref, str):
        raise RlsynthError(f"{folder}: no training data recorded in config.json; pass --data")
    source = load_source(ref, cat)
    if _given(ctx, "temperature") and gen.kind != "autoregressive":
        raise click.BadParameter("applies to autoregressive generators only", param_hint="--temperature")
    for option in ("churn", "polish"):
        if _given(ctx, option) and not diffused:
            raise click.BadParameter("applies to diffusion kinds only", param_hint=f"--{option}")
    explicit = load_generator(refiner) if refiner and gen.kind == "autoregressive" else None
    plan = plan_synthesis(
        gen,
        source,
        n_transitions,
        settings,
        gcfg if gcfg.terms else None,
        seed=seed,
        source_ref=source_lineage(ref, source, cat),
        actor=policy_spec if policy_spec != "data" and not diffused else None,
        refiner=explicit,
        producer={"name": "generator sample"},
    )
    tags = {"generator": gen.kind, "guidance": "+".join(gcfg.terms) or "none"}
    r = plan.write(cat, name, tags=tags)  # parts written as they are sampled
    report_version(cat, r, as_json, "sampled")


def _given(ctx: click.Context, param: str) -> bool:
    """The user set ``param`` (on the command line or through the environment), not its default."""
    source = ctx.get_parameter_source(param)
    return source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
