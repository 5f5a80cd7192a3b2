"""benchmarks/_report.py: a script's section replaces only itself in a docs file; markdown tables."""

from __future__ import annotations

import pytest

from benchmarks._report import grouped, produced_by, table, write_section

DOC = """# Results

Intro by hand.

## Baselines

old baseline table

### Details

old details

## Neural models

```
## not a heading: inside a code block
```

neural text
"""


def test_a_section_replaces_itself_and_its_subsections_only(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(DOC)
    write_section(path, "## Baselines\n\nnew table\n")
    assert path.read_text() == DOC.replace("old baseline table\n\n### Details\n\nold details\n", "new table\n")


def test_headings_inside_code_blocks_do_not_end_a_section(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(DOC + "\n## Later\n\nkept\n")
    write_section(path, "## Neural models\n\nnew neural text")
    assert path.read_text() == DOC[: DOC.index("## Neural models")] + "## Neural models\n\nnew neural text\n\n## Later\n\nkept\n"


def test_a_higher_level_heading_ends_a_section(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# A\n\n## One\n\nold\n# B\n\n## One\n\nother\n")
    write_section(path, "## One\n\nnew\n")
    assert path.read_text() == "# A\n\n## One\n\nnew\n\n# B\n\n## One\n\nother\n"


def test_a_missing_section_is_appended_and_a_missing_file_created(tmp_path):
    path = tmp_path / "performance.md"
    write_section(path, "## Scoring\n\nfigures\n")
    write_section(path, "## Stream\n\nmore\n")
    write_section(path, "## Scoring\n\nnewer\n")
    assert path.read_text() == "# Performance\n\n## Scoring\n\nnewer\n\n## Stream\n\nmore\n"


def test_a_section_must_start_with_a_heading(tmp_path):
    with pytest.raises(ValueError, match="must start with a markdown heading"):
        write_section(tmp_path / "x.md", "no heading\n")


def test_table_and_grouping():
    assert table(["model", "HR@20", "note"], [["pop", 0.1, ""]], align="-r") == ["| model | HR@20 | note |", "|---|---:|---|", "| pop | 0.1 |  |"]
    rows = [{"d": "b", "v": 1}, {"d": "a", "v": 2}, {"d": "b", "v": 3}]
    assert grouped(rows, "d") == {"b": [rows[0], rows[2]], "a": [rows[1]]}


def test_produced_by_shows_the_command_as_a_code_block(monkeypatch):
    from benchmarks import _report

    monkeypatch.setattr("sys.argv", [str(_report.REPO / "benchmarks" / "stream.py"), "--systems", "c"])
    assert produced_by() == ["Produced by:", "", "    python benchmarks/stream.py --systems c", ""]


def test_the_readme_lists_every_benchmark_script_with_what_it_measures():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = root.joinpath("README.md").read_text()
    section = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    scripts = sorted(p.name for p in root.joinpath("benchmarks").glob("[a-z]*.py"))
    assert scripts and [s for s in scripts if f"`{s}`" not in section] == []
