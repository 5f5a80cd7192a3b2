"""The `streamrec` entry point registers every command by name, and a command module that fails to import fails it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = ["broker", "bundle", "data", "demo", "evaluate", "experiment", "export", "publish-model", "replay", "retrain", "score-online", "serve", "train"]


def test_every_command_is_registered():
    from stream.cli import cli

    assert sorted(cli.commands) == COMMANDS


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "stream.cli", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.split("Commands:", 1)[1].splitlines() if line.strip()]
    assert listed == COMMANDS


def test_a_command_module_that_fails_to_import_is_an_error_not_a_missing_command():
    code = "import sys; sys.modules['stream.commands'] = None; import stream.cli"  # None in sys.modules: the import fails
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and "stream.commands" in done.stderr, done.stderr
