"""What the benchmark scripts share for putting their figures into docs/: sections, tables, charts, run context.

A script renders its section as markdown text that starts with its heading
("## Baselines") and hands it to ``write_section``, which replaces that section
of the docs file and leaves every other section (other scripts' figures, prose
written by hand) alone. Scripts import it as ``_report`` (their own folder is
on ``sys.path`` when they run).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
FENCES = ("```", "~~~")
RULES = {"-": "---", "l": ":---", "r": "---:", "c": ":---:"}


def heading_level(line: str) -> int:
    """Markdown heading level of a line ("## x" -> 2), 0 when it is not a heading."""
    hashes = len(line) - len(line.lstrip("#"))
    return hashes if 0 < hashes <= 6 and line[hashes : hashes + 1] == " " else 0


def write_section(path: Path, text: str) -> None:
    """Replace the section of the markdown file ``path`` that has ``text``'s first line as heading by ``text``.

    The section runs from its heading to the next heading of the same or a higher level
    (lines inside fenced code blocks are not headings); a file without it gets ``text``
    appended, and a missing file is created under the title "# <File stem>".
    """
    body = text.strip("\n").splitlines()
    level = heading_level(body[0]) if body else 0
    if not level:
        raise ValueError(f"a section must start with a markdown heading, got {body[:1]}")
    lines = path.read_text().splitlines() if path.is_file() else [f"# {path.stem.capitalize()}"]
    start, end, fenced = None, len(lines), False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(FENCES):
            fenced = not fenced
        elif fenced:
            continue
        elif start is None and line.rstrip() == body[0].rstrip():
            start = i
        elif start is not None and 0 < heading_level(line) <= level:
            end = i
            break
    before, after = (lines, []) if start is None else (lines[:start], lines[end:])
    while before and not before[-1].strip():
        before.pop()
    out = before + [""] * bool(before) + body + [""] * bool(after) + after
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip("\n") + "\n")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """Markdown table lines; ``align`` has one letter per column, "-" plain (the default), "l", "r" or "c"."""
    rule = [RULES[a] for a in align.ljust(len(header), "-")]
    return [_row(header), "|" + "|".join(rule) + "|", *(_row(r) for r in rows)]


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def grouped(rows: Iterable[dict], key: str) -> dict[Any, list[dict]]:
    """Rows grouped by ``row[key]``, groups in the order they first appear."""
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def load_average() -> float:
    """The 1-minute load average: record it beside every timing (the box is shared, timings swing with it)."""
    return os.getloadavg()[0]


def environment(*packages: str) -> str:
    """Where and when figures were measured, for the prose above a table.

    e.g. "x86_64, 2 cores shared with other work, load average 3.1, torch 2.13.0+cpu, 2025-11-28"
    """
    parts = [platform.machine(), f"{os.cpu_count()} cores shared with other work", f"load average {load_average():.1f}"]
    for name in packages:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join([*parts, date.today().isoformat()])


def command_line() -> str:
    """The command that ran this script, as a reader would retype it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def produced_by() -> list[str]:
    """The "Produced by:" lines of a docs section: the command that ran this script, as a code block."""
    return ["Produced by:", "", f"    {command_line()}", ""]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
