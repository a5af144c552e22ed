"""``rlsynth datasets ...``: import, build, inspect, verify, evaluate and export dataset versions."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from rlsynth.datasets.errors import RlsynthError
from rlsynth.pipeline.cli_common import (
    catalog_option,
    echo_json,
    json_option,
    open_catalog,
    report_version,
    summary,
    warn,
)


@click.group()
def datasets() -> None:
    """Import, build, inspect, verify and export dataset versions."""


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
    cat = open_catalog(ctx, catalog_uri)
    ds = load_source(source, cat, env_id=env_id, download=download)
    warn(ds.notes)
    ref = cat.write(
        name,
        ds,
        lineage={"sources": [source_lineage(source, ds, cat)], "notes": list(ds.notes)},
        tags=tag_map,
    )
    report_version(cat, ref, as_json, "imported")


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
    cat = open_catalog(ctx, catalog_uri)
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
            warn([minari_error])
    s = summary(cat.manifest(ref))
    s["minari_id"] = mid if minari_path else None
    s["minari_path"] = str(minari_path) if minari_path else None
    s["warnings"] = [minari_error] if minari_error else []
    if as_json:
        echo_json(s)
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
    cat = open_catalog(ctx, catalog_uri)
    listing = cat.scan()
    warn(listing.problems)
    rows = [summary(dict(m.raw)) for m in listing.manifests]
    if as_json:
        echo_json(rows)
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

    cat = open_catalog(ctx, catalog_uri)
    s = summary(cat.manifest(ref))
    if as_json:
        echo_json(s)
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
    cat = open_catalog(ctx, catalog_uri)
    res = cat.verify(ref)
    problems = res["problems"]
    if as_json:
        echo_json(res)
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
    cat = open_catalog(ctx, catalog_uri)
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
        echo_json(result)
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

    cat = open_catalog(ctx, catalog_uri)
    r = cat.resolve(ref)
    if fmt == "hdf5" and Path(out).exists():
        raise ExportError(f"{out}: already exists; exports never overwrite")
    if fmt == "minari":
        check_minari_id(out)
        path = write_minari(cat.read(r), out)
    else:
        path = write_hdf5(cat.read(r), out)
    if as_json:
        echo_json({"ref": str(r), "format": fmt, "out": out, "path": str(path)})
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
    cat = open_catalog(ctx, catalog_uri)
    older = None if older_than_hours is None else 3600.0 * older_than_hours
    removed = cat.clear_stale_staging(name, older_than_s=older)
    if as_json:
        echo_json({"removed": removed})
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

    cat = open_catalog(ctx, catalog_uri)
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
