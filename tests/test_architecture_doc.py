"""docs/architecture.md's "Where each setting is read" stays true: a row for every setting, and each
module it names reads the setting, directly or through the Settings method it goes through."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def settings_readers() -> dict[str, set[str]]:
    """Settings method or property -> the fields it reads, following the calls between them."""
    tree = ast.parse((ROOT / "stream" / "settings.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    direct: dict[str, set[str]] = {}
    for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
        direct[fn.name] = {a.attr for a in ast.walk(fn) if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "self"}
    fields = {f.name for f in dataclasses.fields(Settings)}
    if "isolation_level" in direct or "exactly_once" in direct:  # properties that ask the broker adapter, which reads the flag
        direct.setdefault("isolation_level", set()).add("broker_quirks")
    reads: dict[str, set[str]] = {}
    for name in direct:
        seen, todo = set(), [name]
        while todo:
            for used in direct.get(todo.pop(), ()):
                if used not in seen:
                    seen.add(used)
                    todo.append(used)
        reads[name] = seen & fields
    return reads


def rows() -> list[tuple[list[str], list[str]]]:
    section = DOC.read_text().split("## Where each setting is read", 1)[1]
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("setting", "---") or not cells[0].startswith("`"):
            continue
        settings = re.findall(r"`([a-z_]+)`", cells[0])
        modules = [m for m in re.findall(r"`([a-z_]+)`", cells[1]) if (ROOT / "stream" / f"{m}.py").exists()]
        out.append((settings, modules))
    return out


def test_every_setting_has_one_row_in_the_architecture_docs_table_of_where_settings_are_read():
    named = [s for settings, _ in rows() for s in settings]
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(named) == sorted(fields), f"missing: {set(fields) - set(named)}, unknown or twice: {[s for s in named if named.count(s) > 1 or s not in fields]}"


def test_each_module_the_table_names_reads_the_settings_of_its_row_directly_or_through_a_settings_method():
    readers = settings_readers()
    wrong = []
    for settings, modules in rows():
        assert modules, f"row {settings} names no stream module"
        for module in modules:
            text = (ROOT / "stream" / f"{module}.py").read_text()
            for setting in settings:
                through = [m for m, fields in readers.items() if setting in fields]
                if not re.search(rf"\.{setting}\b", text) and not any(re.search(rf"\.{m}\b", text) for m in through):
                    wrong.append(f"{module} does not read {setting}")
    assert not wrong, wrong
