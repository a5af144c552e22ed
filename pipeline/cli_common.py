"""What every command group of the ``rlsynth`` CLI shares: the catalog and --json options, JSON output,
warnings."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

# Kept in step with generators.api.KINDS (imported lazily: torch is slow to import for --help).
GENERATOR_KINDS = ("trajectory", "transition", "autoregressive", "world-model")

F = TypeVar("F", bound=Callable[..., Any])


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def warn(lines: Any) -> None:
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


def open_catalog(ctx: click.Context, uri: str | None) -> Any:
    """The catalog named by ``--catalog`` (here or before the command). Opening it creates nothing: the
    root appears with the first commit, so read-only commands never write."""
    from rlsynth.datasets.catalog import Catalog

    return Catalog(uri or (ctx.obj or {}).get("catalog_uri"))


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


def report_version(cat: Any, ref: Any, as_json: bool, verb: str) -> None:
    s = summary(cat.manifest(ref))
    if as_json:
        echo_json(s)
    else:
        click.echo(
            f"{verb} {ref}: {s['episodes']} episodes, {s['transitions']} transitions, "
            f"env {s['env_id']}, {s['content_hash'][:19]}"
        )
