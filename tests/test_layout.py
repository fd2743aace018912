"""The house rules that keep the layout of docs/architecture.md true, checked on the source text.

* Flags live at the edges: no module of the library (``src/partwhole``) imports absl, reads ``FLAGS`` or
  names a command-line flag; its errors name settings, and the command lines (``src/partwhole_cli``)
  name the flags.
* The library never imports the command lines.
* Nothing edits the import path: the project is installed (``pyproject.toml``).
* No function in ``src/`` is longer than 80 lines.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "src" / "partwhole"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")  # --name, as a user types it (not "---" rules or "a--b")
LONGEST_FUNCTION = 80


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_library_module_reads_no_flags_and_names_none(path):
    text = path.read_text()
    tree = ast.parse(text)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("absl", "partwhole_cli")}, f"{path} imports {imported}"
    assert "FLAGS" not in text
    named = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if FLAG.search(line)]
    assert not named, f"{path.relative_to(REPO)} names command-line flags: {named[:5]}"


def test_nothing_edits_the_import_path():
    pattern = "sys" + ".path"  # spelled in two halves, so that this file passes its own check
    offenders = [str(p.relative_to(REPO)) for folder in ("src", "bench", "experiments", "tests")
                 for p in (REPO / folder).rglob("*.py") if pattern in p.read_text()]
    assert not offenders


def test_no_function_in_src_is_longer_than_80_lines():
    long = []
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long


def test_the_flag_pattern_finds_flags_and_only_flags():
    assert FLAG.findall("use --img_size=64 or --crop; not ---- nor a--b nor x-y") == ["--img_size", "--crop"]
