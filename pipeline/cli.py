"""The ``rlsynth`` command line.

Every error a user can cause ends as one ``error: ...`` line on stderr and a non-zero exit (1 for
rlsynth errors, 2 for usage errors); ``RLSYNTH_DEBUG=1`` shows the traceback of unexpected failures.
Every command that reports takes ``--json``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from rlsynth.datasets.errors import RlsynthError
from rlsynth.generators.options import SamplerSettings
from rlsynth.guidance.options import GuidanceConfig
from rlsynth.pipeline.cli_options import from_params, group_options

# Kept in step with generators.api.KINDS (imported lazily: torch is slow to import for --help).
GENERATOR_KINDS = ("trajectory", "transition", "autoregressive", "world-model")

F = TypeVar("F", bound=Callable[..., Any])


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _warn(lines: Any) -> None:
    for line in lines:
        click.echo(f"warning: {line}", err=True)


def catalog_option(f: F) -> F:
    return click.option(
        "--catalog",
        "catalog_uri",
        default=None,
        metavar="URI",
        help="Catalog location (path or pyarrow filesystem URI); "
        "default $RLSYNTH_CATALOG or ~/.rlsynth/catalog.",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)


def _catalog(ctx: click.Context, uri: str | None) -> Any:
    """The catalog named by ``--catalog`` (here or before the command). Opening it creates nothing: the
    root appears with the first commit, so read-only commands never write."""
    from rlsynth.datasets.catalog import Catalog

    return Catalog(uri or (ctx.obj or {}).get("catalog_uri"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@catalog_option
@click.version_option(package_name="rlsynth")
@click.pass_context
def cli(ctx: click.Context, catalog_uri: str | None) -> None:
    """rlsynth: offline-RL data synthesis with versioned datasets."""
    ctx.ensure_object(dict)
    ctx.obj["catalog_uri"] = catalog_uri


@cli.group()
def datasets() -> None:
    """Import, build, inspect, verify and export dataset versions."""


def summary(man: dict[str, Any]) -> dict[str, Any]:
    """The ``datasets show`` record (DESIGN.md contract keys first)."""
    return {
        "name": man["name"],
        "version": man["version"],
        "ref": f"{man['name']}@{man['version']}",
        "episodes": man["counts"]["episodes"],
        "transitions": man["counts"]["transitions"],
        "content_hash": man["content_hash"],
        "env_id": man["env_id"],
        "lineage": man["lineage"],
        "stats": man["stats"],
        "counts": man["counts"],
        "created": man["created"],
        "tags": man["tags"],
        "files": man.get("files", {}),
        "fidelity": man.get("fidelity"),
    }


def _parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for t in tags:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"'{t}' is not KEY=VALUE", param_hint="--tag")
        out[k] = v
    return out


@datasets.command("import")
@click.argument("source")
@click.option("--name", required=True, help="Catalog name of the new version.")
@click.option(
    "--env", "env_id", default=None, help="Environment id (overrides an HDF5 file's env_id attribute)."
)
@click.option("--download", is_flag=True, help="minari: fetch from Minari's remote when not found locally.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the version (repeatable).")
@catalog_option
@json_option
@click.pass_context
def import_cmd(
    ctx: click.Context,
    source: str,
    name: str,
    env_id: str | None,
    download: bool,
    tags: tuple[str, ...],
    catalog_uri: str | None,
    as_json: bool,
) -> None:
    """Import SOURCE (minari:<id>, a D4RL-layout .hdf5 file, or NAME@N) as a new version of NAME."""
    from rlsynth.datasets.catalog import check_name
    from rlsynth.datasets.sources import load_source, source_lineage

    check_name(name)
    tag_map = _parse_tags(tags)
    cat = _catalog(ctx, catalog_uri)
    ds = load_source(source, cat, env_id=env_id, download=download)
    _warn(ds.notes)
    ref = cat.write(
        name,
        ds,
        lineage={"sources": [source_lineage(source, ds, cat)], "notes": list(ds.notes)},
        tags=tag_map,
    )
    _report_version(cat, ref, as_json, "imported")


def _report_version(cat: Any, ref: Any, as_json: bool, verb: str) -> None:
    s = summary(cat.manifest(ref))
    if as_json:
        _echo_json(s)
    else:
        click.echo(
            f"{verb} {ref}: {s['episodes']} episodes, {s['transitions']} transitions, "
            f"env {s['env_id']}, {s['content_hash'][:19]}"
        )


@datasets.command("make")
@click.argument("recipe", type=click.Choice(["random", "sac-medium-replay", "sac-medium"]))
@click.option("--env", "env_id", required=True, help="Gymnasium environment id, e.g. Hopper-v5.")
@click.option("--name", required=True, help="Catalog name of the new version.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="SAC recipes: online training steps.",
)
@click.option(
    "--transitions",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="random / sac-medium: transitions to record.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--target-return",
    type=float,
    default=None,
    help="SAC recipes: stop once the last 5 episodes average this return.",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=5000,
    show_default=True,
    help="SAC recipes: random steps before learning (capped at steps/5).",
)
@click.option(
    "--minari-id",
    default=None,
    help="Id of the local Minari dataset written beside the version (default rlsynth/NAME-vN).",
)
@click.option("--no-minari", is_flag=True, help="Do not write the local Minari dataset.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@catalog_option
@json_option
@click.pass_context
def make_cmd(
    ctx: click.Context,
    recipe: str,
    env_id: str,
    name: str,
    steps: int,
    transitions: int,
    seed: int,
    target_return: float | None,
    warmup_steps: int,
    minari_id: str | None,
    no_minari: bool,
    quiet: bool,
    catalog_uri: str | None,
    as_json: bool,
) -> None:
    """Build a D4RL-style dataset locally with RECIPE and commit it (and a local Minari dataset)."""
    from dataclasses import asdict

    from rlsynth.datasets.agents import save_agent
    from rlsynth.datasets.catalog import check_name
    from rlsynth.datasets.minari_io import check_minari_id, minari_root, write_minari
    from rlsynth.datasets.recipes import RecipeConfig, build

    check_name(name)
    if not no_minari:
        _check_minari_root(minari_root())  # before the catalog is opened (which creates its folder)
    cat = _catalog(ctx, catalog_uri)
    cfg = RecipeConfig(
        recipe=recipe,
        env_id=env_id,
        steps=steps,
        transitions=transitions,
        seed=seed,
        target_return=target_return,
        warmup_steps=warmup_steps,
        progress=not quiet,
    )
    existing = cat.versions(name)
    next_version = existing[-1] + 1 if existing else 1
    mid = None if no_minari else check_minari_id(minari_id or f"rlsynth/{name}-v{next_version}")
    if mid is not None and (minari_root() / mid).exists():
        raise RlsynthError(f"Minari dataset '{mid}' already exists; pass --minari-id or --no-minari")
    result = build(cfg)
    lineage = {"recipe": {**asdict(cfg), "details": result.details}, "seeds": {"recipe": seed}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        if result.agent is not None:
            files["agent.d3"] = Path(tmp) / "agent.d3"
            save_agent(result.agent, files["agent.d3"], {"recipe": recipe, "env_id": env_id})
        ref = cat.write(name, result.dataset, lineage=lineage, tags={"recipe": recipe}, files=files)
    # The version is committed: from here the command has succeeded, and the optional Minari copy
    # failing is a warning (exit 0), never an error that would invite a retry committing another version.
    minari_path, minari_error = None, None
    if mid is not None:
        try:
            minari_path = write_minari(cat.read(ref), mid)
        except (RlsynthError, OSError) as e:
            minari_error = f"{ref} committed, but its Minari copy {mid} was not written: {_one_line(e)}"
            _warn([minari_error])
    s = summary(cat.manifest(ref))
    s["minari_id"] = mid if minari_path else None
    s["minari_path"] = str(minari_path) if minari_path else None
    s["warnings"] = [minari_error] if minari_error else []
    if as_json:
        _echo_json(s)
    else:
        click.echo(f"made {ref}: {s['episodes']} episodes, {s['transitions']} transitions, env {env_id}")
        if minari_path:
            click.echo(f"minari dataset {mid} at {minari_path}")
        if "agent.d3" in s["files"]:
            click.echo(
                f"agent stored with the version as agent.d3 (rlsynth datasets export-file {ref} agent.d3)"
            )


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _check_minari_root(root: Path) -> None:
    """Before anything is built or committed: the Minari copy's root must be (or can become) a folder."""
    if any(p.exists() and not p.is_dir() for p in (root, *root.parents)):
        raise RlsynthError(f"Minari root {root} ($MINARI_DATASETS_PATH) is not a folder; pass --no-minari")


@datasets.command("list")
@catalog_option
@json_option
@click.pass_context
def list_cmd(ctx: click.Context, catalog_uri: str | None, as_json: bool) -> None:
    """List every version in the catalog (a damaged one is skipped with a warning on stderr)."""
    cat = _catalog(ctx, catalog_uri)
    listing = cat.scan()
    _warn(listing.problems)
    rows = [summary(dict(m.raw)) for m in listing.manifests]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"catalog {cat.uri} is empty")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"catalog {cat.uri}")
    for col in ("version", "env", "episodes", "transitions", "created", "content hash"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["ref"],
            str(r["env_id"]),
            str(r["episodes"]),
            str(r["transitions"]),
            r["created"],
            r["content_hash"][:19],
        )
    Console().print(table)


@datasets.command("show")
@click.argument("ref")
@catalog_option
@json_option
@click.pass_context
def show_cmd(ctx: click.Context, ref: str, catalog_uri: str | None, as_json: bool) -> None:
    """Show one version (NAME for the latest, or NAME@N)."""
    from rlsynth.datasets.errors import one_line

    cat = _catalog(ctx, catalog_uri)
    s = summary(cat.manifest(ref))
    if as_json:
        _echo_json(s)
        return
    st = s["stats"]  # every field below was type-checked by the manifest parser
    click.echo(f"{s['ref']}  env {s['env_id']}  created {s['created']}")
    click.echo(
        f"  {s['episodes']} episodes ({s['counts']['terminated_episodes']} terminated, "
        f"{s['counts']['truncated_episodes']} truncated), {s['transitions']} transitions"
    )
    click.echo(
        f"  episode return mean {st['episode_return']['mean']:.2f} ± {st['episode_return']['std']:.2f} "
        f"[{st['episode_return']['min']:.2f}, {st['episode_return']['max']:.2f}]"
    )
    click.echo(f"  content hash {s['content_hash']}")
    # Lineage and tags are free text from the manifest: one_line escapes control characters, so a
    # crafted manifest cannot add lines or rewrite the terminal.
    for src in s["lineage"].get("sources") or []:
        click.echo(one_line(f"  source {src.get('source')} ({str(src.get('content_hash', ''))[:19]})"))
    recipe = s["lineage"].get("recipe")
    if recipe:
        click.echo(one_line(f"  recipe {recipe['recipe']} seed {recipe.get('seed')}"))
    if s["tags"]:
        click.echo(one_line("  tags " + ", ".join(f"{k}={v}" for k, v in s["tags"].items())))
    if s["files"]:
        click.echo("  files " + ", ".join(s["files"]))


@datasets.command("verify")
@click.argument("ref")
@catalog_option
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, ref: str, catalog_uri: str | None, as_json: bool) -> None:
    """Check every manifest field against the version's files (hashes, counts, stats, part list, no
    links); exit 1 if anything differs. Prints the first problem; --json lists them all."""
    cat = _catalog(ctx, catalog_uri)
    res = cat.verify(ref)
    problems = res["problems"]
    if as_json:
        _echo_json(res)
    elif res["ok"]:
        click.echo(f"{res['name']}@{res['version']}: ok ({res['content_hash']})")
    else:
        click.echo(f"error: {res['name']}@{res['version']} is damaged: {problems[0]}", err=True)
        if len(problems) > 1:
            click.echo(f"  and {len(problems) - 1} more problem(s) (--json lists them all)", err=True)
    if not res["ok"]:
        sys.exit(1)


@datasets.command("evaluate")
@click.argument("ref")
@click.option("--env", "env_id", default=None, help="Environment of the oracle (default: the dataset's).")
@click.option(
    "--policy",
    "policy_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="d3rlpy agent (.d3): report the log-likelihood of the actions under it.",
)
@click.option(
    "--reference",
    default=None,
    help="NAME@N whose std normalises errors and that novelty and "
    "coverage are measured against (default: the dataset itself; no novelty then).",
)
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Evaluate this many rows (seeded).")
@click.option(
    "--windows",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Open-loop windows per horizon.",
)
@click.option("--horizons", default="1,8,32", show_default=True, help="Comma-separated open-loop horizons.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--plot", "plot_path", default=None, help="PNG to draw (default: <name>-v<N>-fidelity.png here)."
)
@click.option("--no-store", is_flag=True, help="Do not record the result in the version's manifest.")
@catalog_option
@json_option
@click.pass_context
def evaluate_cmd(
    ctx: click.Context,
    ref: str,
    env_id: str | None,
    policy_path: str | None,
    reference: str | None,
    sample: int | None,
    windows: int,
    horizons: str,
    seed: int,
    plot_path: str | None,
    no_store: bool,
    catalog_uri: str | None,
    as_json: bool,
) -> None:
    """Judge a version against the true simulator: one-step and multi-step dynamics error, terminal
    agreement, policy log-likelihood, novelty and coverage. The result goes into the manifest."""
    from rlsynth.datasets.fidelity import EvalConfig, evaluate, plot
    from rlsynth.datasets.sources import file_sha256

    try:
        hs = tuple(sorted({int(h) for h in horizons.split(",")}))
    except ValueError:
        raise click.BadParameter(
            f"'{horizons}' is not a comma-separated list of integers", param_hint="--horizons"
        ) from None
    if not hs or min(hs) < 1:
        raise click.BadParameter("horizons must be positive", param_hint="--horizons")
    cat = _catalog(ctx, catalog_uri)
    r = cat.resolve(ref)
    policy = None
    if policy_path is not None:
        from rlsynth.guidance.policies import load_policy

        policy = load_policy(policy_path)
    ds = cat.read(r)
    ref_ds = cat.read(reference) if reference else None
    cfg = EvalConfig(sample=sample, horizons=hs, windows=windows, seed=seed)
    result = evaluate(ds, env_id=env_id, reference=ref_ds, policy=policy, config=cfg)
    if policy_path is not None:
        result["policy"] = {
            "path": str(Path(policy_path).resolve()),
            "sha256": file_sha256(Path(policy_path)),
            "kind": policy.kind if policy is not None else None,
        }
    out_png = Path(plot_path or f"{r.name.replace('/', '-')}-v{r.version}-fidelity.png")
    result["plot"] = str(plot(result, out_png).resolve())
    if not no_store:
        cat.annotate(r, "fidelity", result)
    if as_json:
        _echo_json(result)
        return
    one = result["one_step"]
    click.echo(
        f"{r} on {result['env_id']}: {result['evaluated_rows']} of {result['total_rows']} rows"
        + (" (sampled)" if result["sampled"] else "")
    )
    click.echo(
        f"  one-step normalised obs MSE {one['obs_mse_normalised']:.3g} over {one['rows']} restorable rows "
        f"({one['unrecoverable_rows']} unrecoverable; all rows {one['obs_mse_normalised_all_rows']:.3g})"
    )
    click.echo(f"  reward MAE {one['reward_mae']:.3g}, terminal agreement {one['terminal_agreement']:.4f}")
    if one["penetration_over_1cm"] is not None:
        click.echo(
            f"  states into contact by > 1 cm: {one['penetration_over_1cm']:.1%} "
            f"(> 5 cm: {one['penetration_over_5cm']:.1%})"
        )
    for h, v in result["horizons"].items():
        val = "n/a" if v["obs_mse_normalised"] is None else f"{v['obs_mse_normalised']:.3g}"
        click.echo(f"  horizon {h}: normalised obs MSE {val} ({v['windows']} windows)")
    if result["policy_log_likelihood"]:
        click.echo(f"  policy log-likelihood {result['policy_log_likelihood']['mean']:.3f} per row")
    if result["novelty"]:
        click.echo(
            f"  novelty {result['novelty']['mean']:.3f} (reference spacing "
            f"{result['reference_spacing']['mean']:.3f}), coverage {result['coverage']:.3f}"
        )
    click.echo(f"  plot {result['plot']}")


@datasets.command("export")
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["minari", "hdf5"]), required=True)
@click.option("--out", required=True, help="minari: dataset id namespace/name-vN; hdf5: the file to write.")
@catalog_option
@json_option
@click.pass_context
def export_cmd(
    ctx: click.Context, ref: str, fmt: str, out: str, catalog_uri: str | None, as_json: bool
) -> None:
    """Export a version as a Minari dataset or a D4RL-layout HDF5 file (never overwrites)."""
    from rlsynth.datasets.errors import ExportError
    from rlsynth.datasets.hdf5 import write_hdf5
    from rlsynth.datasets.minari_io import check_minari_id, write_minari

    cat = _catalog(ctx, catalog_uri)
    r = cat.resolve(ref)
    if fmt == "hdf5" and Path(out).exists():
        raise ExportError(f"{out}: already exists; exports never overwrite")
    if fmt == "minari":
        check_minari_id(out)
        path = write_minari(cat.read(r), out)
    else:
        path = write_hdf5(cat.read(r), out)
    if as_json:
        _echo_json({"ref": str(r), "format": fmt, "out": out, "path": str(path)})
    else:
        click.echo(f"exported {r} as {fmt} to {path}")


@datasets.command("gc")
@click.argument("name", required=False)
@click.option(
    "--older-than-hours",
    type=click.FloatRange(min=0),
    default=None,
    help="Also clear staging untouched this long (writers on other hosts, or unrecorded ones).",
)
@catalog_option
@json_option
@click.pass_context
def gc_cmd(
    ctx: click.Context,
    name: str | None,
    older_than_hours: float | None,
    catalog_uri: str | None,
    as_json: bool,
) -> None:
    """Clear staging left by killed writers (of NAME, or of every name); a live writer's is kept.

    Every successful commit already clears dead writers' staging on this host; this clears it on demand."""
    cat = _catalog(ctx, catalog_uri)
    older = None if older_than_hours is None else 3600.0 * older_than_hours
    removed = cat.clear_stale_staging(name, older_than_s=older)
    if as_json:
        _echo_json({"removed": removed})
    else:
        click.echo(f"removed {len(removed)} staging entr{'y' if len(removed) == 1 else 'ies'}")
        for r in removed:
            click.echo(f"  {r}")


@datasets.command("export-file")
@click.argument("ref")
@click.argument("file_name")
@click.option("--out", default=None, help="Where to write it (default: FILE_NAME in the current folder).")
@catalog_option
@click.pass_context
def export_file_cmd(
    ctx: click.Context, ref: str, file_name: str, out: str | None, catalog_uri: str | None
) -> None:
    """Copy an artifact stored with a version (e.g. a recipe's agent.d3) out of the catalog.

    The artifact is read without following links (one outside the catalog is refused) and checked
    against its recorded size and hash before anything is written; the copy never replaces a file."""
    from rlsynth.datasets.atomic import publish_file
    from rlsynth.datasets.errors import ExportError

    cat = _catalog(ctx, catalog_uri)
    data = cat.file_buffer(ref, file_name)
    target = Path(out or file_name)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent.resolve(), prefix=f".{target.name}.")
    except OSError as e:
        raise ExportError(f"{target}: cannot be written ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        publish_file(tmp, target)
    except OSError as e:
        raise ExportError(f"{target}: cannot be written ({e.strerror})") from None
    finally:
        os.unlink(tmp)
    click.echo(f"wrote {target}")


@cli.group()
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
    cat = _catalog(ctx, catalog_uri)
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
        _echo_json(summary_)
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
    from rlsynth.offline_rl.synthesis import synthesize

    settings = from_params(SamplerSettings, options)
    check_name(name)
    cat = _catalog(ctx, catalog_uri)
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
    made = synthesize(
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
    r = cat.write(name, made.dataset, lineage=made.lineage, tags=tags)
    _report_version(cat, r, as_json, "sampled")


def _given(ctx: click.Context, param: str) -> bool:
    """The user set ``param`` (on the command line or through the environment), not its default."""
    source = ctx.get_parameter_source(param)
    return source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


@cli.group()
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
    cat = _catalog(ctx, catalog_uri)
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
        _echo_json(result)
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
        _echo_json(res.to_json())
        return
    line = f"{env_id}: return {res.return_mean:.1f} ± {res.return_std:.1f} over {episodes} episodes"
    if res.score_mean is not None:
        line += f"; normalised score {res.score_mean:.1f} ± {res.score_std:.1f}"
    click.echo(line)


class StageView:
    """One live table of the run's stages and their latest progress (on a terminal; plain lines otherwise)."""

    STAGES = ("source", "target", "generator", "world-model", "synthesize", "fidelity", "agents")

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live: Any = None
        self.rows: dict[str, str] = {}

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="rlsynth run", show_header=True)
        t.add_column("stage")
        t.add_column("status")
        for name in self.STAGES:
            if name in self.rows or name != "world-model":
                t.add_row(name, self.rows.get(name, "waiting"))
        return t

    def update(self, line: str) -> None:
        if line.startswith("[") and "]" in line:
            name, rest = line[1:].split("]", 1)
            self.rows[name] = rest.strip()
            if self.live is not None:
                self.live.update(self.table())
        elif self.live is not None:
            self.console.print(line)  # e.g. which Ray cluster the run uses: above the live table

    def __enter__(self) -> StageView:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.table(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)


RUNS_ROOT_HELP = "Folder of run folders and the shared stage cache (default: $RLSYNTH_RUNS or ./runs)."


def _runs_root(runs: str | None) -> Path:
    return Path(runs or os.environ.get("RLSYNTH_RUNS") or "runs")


@cli.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option(
    "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)."
)
@click.option(
    "--resume", "resume", default=None, help="Resume this run folder (finished stages are skipped)."
)
@click.option("--runs", "runs", default=None, help=RUNS_ROOT_HELP)
@catalog_option
@click.pass_context
def run_cmd(
    ctx: click.Context,
    config_path: str,
    address: str | None,
    resume: str | None,
    runs: str | None,
    catalog_uri: str | None,
) -> None:
    """Run the whole pipeline from a YAML config as Ray tasks; prints the report and dataset versions."""
    from rlsynth.pipeline.config import load_config
    from rlsynth.pipeline.run import check_ray_address, check_resume, new_run_dir, run_pipeline

    cfg = load_config(config_path)
    check_ray_address(address)  # a named cluster that cannot be reached is refused before a run folder exists
    if resume is not None:
        run_dir = Path(resume)
        check_resume(run_dir)
    else:
        run_dir = new_run_dir(_runs_root(runs), cfg.name)
    cat = _catalog(ctx, catalog_uri)
    log_path = run_dir / "run.log"
    run_dir.mkdir(parents=True, exist_ok=True)

    view = StageView()

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        with open(log_path, "a") as f:
            f.write(stamped + "\n")
        view.update(line)
        if not view.live:
            click.echo(stamped, err=True)

    with view:
        m = run_pipeline(cfg, run_dir, catalog_uri=cat.uri, address=address, log=log)
    st = m["stages"]
    click.echo(f"report: {run_dir / 'report.md'}")
    click.echo(f"source data: {st['source']['ref']}  synthetic data: {st['synthesize']['ref']}")


@cli.group()
def runs() -> None:
    """Pipeline runs: list them, show one."""


@runs.command("list")
@click.option("--runs", "runs_dir", default=None, help=RUNS_ROOT_HELP)
@json_option
def runs_list_cmd(runs_dir: str | None, as_json: bool) -> None:
    """Every run folder with its status."""
    root = _runs_root(runs_dir)
    rows = []
    for d in sorted(root.glob("*/config.yaml")):
        m = d.parent / "metrics.json"
        rows.append({"run": d.parent.name, "path": str(d.parent), "finished": m.is_file()})
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['run']}  {'finished' if r['finished'] else 'unfinished'}")


@runs.command("show")
@click.argument("run")
@click.option("--runs", "runs_dir", default=None, help=RUNS_ROOT_HELP)
@json_option
def runs_show_cmd(run: str, runs_dir: str | None, as_json: bool) -> None:
    """A run's metrics (or, unfinished, its log)."""
    d = Path(run) if Path(run).is_dir() else _runs_root(runs_dir) / run
    if not (d / "config.yaml").is_file():
        raise RlsynthError(f"{run}: no such run (see rlsynth runs list)")
    m = d / "metrics.json"
    if as_json:
        _echo_json(json.loads(m.read_text()) if m.is_file() else {"run": str(d), "finished": False})
        return
    if (d / "report.md").is_file():
        click.echo((d / "report.md").read_text())
    else:
        log = d / "run.log"
        click.echo(f"{d}: unfinished\n" + (log.read_text() if log.is_file() else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every failure into one line and an exit code."""
    from rlsynth.datasets.atomic import Terminated, sigterm_as_interrupt

    # SIGTERM (timeout, Kubernetes, Ray) takes Ctrl-C's clean-up paths: no staging or partial output left.
    sigterm_as_interrupt()
    try:
        cli.main(args=argv, prog_name="rlsynth", standalone_mode=False)
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, Terminated):  # click turns every KeyboardInterrupt into Abort
            click.echo("terminated", err=True)
            return 143
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except RlsynthError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except Terminated:
        click.echo("terminated", err=True)
        return 143
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:
        if os.environ.get("RLSYNTH_DEBUG"):
            traceback.print_exc()
        click.echo(
            f"error: unexpected {type(e).__name__}: {e} (set RLSYNTH_DEBUG=1 for the traceback)", err=True
        )
        return 1
    return 0


def entry() -> None:
    """Console entry point: :func:`main`, Python's own clean-up, then a hard exit.

    Why the hard exit: at interpreter shutdown a native library's worker thread is sometimes destroyed
    while still joinable ("terminate called without an active exception", SIGABRT, exit code -6) — seen
    in about 1 of 8 ``generator sample`` runs on a loaded 2-core machine, after the version had been
    committed. Every file is closed and renamed into place before main() returns, and the atexit handlers
    (Ray shutdown, logging, temporary files) still run here; only C++ static destruction is skipped.
    """
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
