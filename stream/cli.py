"""The `streamrec` command: one entry point that mounts each package's commands.

Problems the user can fix (`UserError`) print one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from streamrec.errors import UserError

# (module, attribute) of every command or group mounted under `streamrec`.
COMMANDS = [
    ("training.cli_data", "data"),
    ("training.cli", "train"),
    ("training.cli", "evaluate"),
    ("export.cli", "export"),
    ("export.cli", "bundle"),
    ("stream.commands", "serve"),
    ("stream.commands", "broker"),
    ("stream.commands", "replay"),
    ("stream.commands", "score_online"),
    ("stream.commands", "publish_model"),
    ("stream.commands", "retrain"),
    ("stream.commands", "experiment"),
    ("stream.commands", "demo"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """streamrec: session-based recommendations trained offline, served over Kafka."""


def _mount() -> None:
    for module, attr in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        command = getattr(mod, attr, None)
        if command is not None:
            cli.add_command(command)


_mount()


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
