"""The `streamrec` command: one entry point that registers each package's commands, by name.

Problems the user can fix (`UserError`) print one line and exit 2.
"""

from __future__ import annotations

import sys

import click

from export.cli import bundle, export
from stream.commands import broker, demo, experiment, publish_model, replay, retrain, score_online, serve
from streamrec.errors import UserError
from training.cli import evaluate, train
from training.cli_data import data


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """streamrec: session-based recommendations trained offline, served over Kafka."""


# Every command, registered by name: a command module that fails to import fails the CLI, it does not vanish from it.
for command in (data, train, evaluate, export, bundle, serve, broker, replay, score_online, publish_model, retrain, experiment, demo):
    cli.add_command(command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad flag or value: one line, like a UserError
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
