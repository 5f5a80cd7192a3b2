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


def test_the_demo_finds_the_yoochoose_sample_through_a_setting(tmp_path):
    """--yoochoose-dir / STREAMREC_DEMO_DATA, not a path written into the code; a wrong one is a one-line error."""
    from stream.cli import cli
    from stream.demo import DemoConfig, prepare_data
    from streamrec.errors import UserError

    option = next(p for p in cli.commands["demo"].params if p.name == "yoochoose_dir")
    assert option.envvar == "STREAMREC_DEMO_DATA"
    try:
        prepare_data(DemoConfig(data="yoochoose", yoochoose_dir=tmp_path / "elsewhere"), tmp_path / "data")
    except UserError as e:
        assert str(tmp_path / "elsewhere") in str(e) and "STREAMREC_DEMO_DATA" in str(e)
    else:
        raise AssertionError("no error for a missing sample")
