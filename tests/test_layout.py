"""The layout rules of docs/architecture.md, checked: no file in fedfuse/ or strategies/
over 400 lines, no class over 250, at most 8 modules directly in fedfuse/, and every
package says what it holds."""

from __future__ import annotations

import ast

from tests.helpers import ROOT

SOURCES = [*sorted((ROOT / "fedfuse").rglob("*.py")), *sorted((ROOT / "strategies").rglob("*.py"))]


def test_no_file_over_400_lines_and_no_class_over_250():
    too_long = {}
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n") + 1
        if lines > 400:
            too_long[str(path.relative_to(ROOT))] = lines
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                span = node.end_lineno - node.lineno + 1
                if span > 250:
                    too_long[f"{path.relative_to(ROOT)}:{node.name}"] = span
    assert too_long == {}


def test_fedfuse_has_at_most_eight_top_level_modules():
    top = sorted(p.name for p in (ROOT / "fedfuse").glob("*.py"))
    assert len(top) <= 8, top


def test_every_package_has_a_docstring():
    packages = [ROOT / "strategies", *(p for p in (ROOT / "fedfuse").iterdir()
                                       if (p / "__init__.py").is_file())]
    missing = [p.name for p in packages
               if ast.get_docstring(ast.parse((p / "__init__.py").read_text())) is None]
    assert missing == []
