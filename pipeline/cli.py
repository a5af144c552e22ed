"""The ``rlsynth`` command line.

Every error a user can cause ends as one ``error: ...`` line on stderr and a non-zero exit (1 for
rlsynth errors, 2 for usage errors); ``RLSYNTH_DEBUG=1`` shows the traceback of unexpected failures.
Every command that reports takes ``--json``.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback

import click

from rlsynth.datasets.errors import RlsynthError
from rlsynth.pipeline.cli_agent import agent
from rlsynth.pipeline.cli_common import catalog_option
from rlsynth.pipeline.cli_datasets import datasets
from rlsynth.pipeline.cli_generator import generator
from rlsynth.pipeline.cli_runs import run_cmd, runs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@catalog_option
@click.version_option(package_name="rlsynth")
@click.pass_context
def cli(ctx: click.Context, catalog_uri: str | None) -> None:
    """rlsynth: offline-RL data synthesis with versioned datasets."""
    ctx.ensure_object(dict)
    ctx.obj["catalog_uri"] = catalog_uri


for _group in (datasets, generator, agent, run_cmd, runs):
    cli.add_command(_group)


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
