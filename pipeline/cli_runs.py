"""``rlsynth run`` and ``rlsynth runs ...``: the whole pipeline as Ray tasks, and its run folders."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from rlsynth.datasets.errors import RlsynthError
from rlsynth.pipeline.cli_common import catalog_option, echo_json, json_option, open_catalog


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


@click.command("run")
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
    cat = open_catalog(ctx, catalog_uri)
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


@click.group()
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
        echo_json(rows)
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
        echo_json(json.loads(m.read_text()) if m.is_file() else {"run": str(d), "finished": False})
        return
    if (d / "report.md").is_file():
        click.echo((d / "report.md").read_text())
    else:
        log = d / "run.log"
        click.echo(f"{d}: unfinished\n" + (log.read_text() if log.is_file() else ""))
