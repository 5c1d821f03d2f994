"""The package's shape: a small public face, short modules (docs/architecture.md).

The layer contracts (imports one way, no cycles) are checked by ``lint-imports``
(``[tool.importlinter]`` in pyproject.toml), which ``make test`` runs before pytest.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nahtlos

PACKAGE = Path(nahtlos.__file__).parent
MAX_MODULE_LINES = 800


def test_public_face_is_small_and_has_no_private_names() -> None:
    assert len(nahtlos.__all__) <= 30, nahtlos.__all__
    assert len(set(nahtlos.__all__)) == len(nahtlos.__all__)
    assert not [n for n in nahtlos.__all__ if n.startswith("_")]
    for name in nahtlos.__all__:
        assert getattr(nahtlos, name) is not None, name


def test_every_subpackage_all_is_importable() -> None:
    import importlib

    for init in PACKAGE.rglob("__init__.py"):
        rel = init.parent.relative_to(PACKAGE.parent)
        module = importlib.import_module(".".join(rel.parts))
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name!r}"
            assert not name.startswith("_"), f"{module.__name__} exports private {name!r}"


def test_no_module_is_longer_than_800_lines() -> None:
    lengths = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    long = {k: v for k, v in lengths.items() if v > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_modules_parse_and_have_a_docstring() -> None:
    for p in PACKAGE.rglob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{p.relative_to(PACKAGE)} has no module docstring"
