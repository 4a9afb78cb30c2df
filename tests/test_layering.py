"""The package's layers, bottom first, and the check that every import inside the package goes down them.

Each module is parsed with ``ast`` (nothing is imported), and every import of the package's own modules counts: at
module top, inside a function, under ``TYPE_CHECKING`` alike. docs/architecture.md explains the order.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = "hf_compress_prompt"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom first. Each layer names its units and the modules a unit holds (dotted paths inside the package, each with
# its submodules; the package's own ``__init__`` is "__init__"). A module belongs to the unit with the longest path
# that matches it. It may import its own unit and the layers below; not another unit of its layer, nor a layer above.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"foundation": ("_logging", "errors", "validation", "autocast")},
    {"formats": ("formats",), "methods": ("methods",), "data": ("data",)},
    {"kernels": ("kernels",), "evaluation": ("evaluation",)},
    {"nn": ("nn",)},
    {"recovery core": ("recovery",)},
    {"integrations": ("integrations",), "serving": ("serving",)},  # serving: vLLM prompt_embeds (recovery core only)
    {"models": ("models",)},
    {"compressors": ("compressors",)},
    {"recovery training": ("recovery.train", "recovery.distill", "recovery.shared", "recovery.trainer_setup")},
    {"compresso": ("compressors.compresso",)},
    {"package": ("__init__",)},
    {"demo": ("demo",)},
    {"cli": ("cli", "__main__")},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _parsed() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(SOURCE.rglob("*.py"))}


def package_modules() -> dict[str, tuple[Path, ast.Module]]:
    """Module name -> (file, parsed source) for every module of the package (a fresh dict a test may extend)."""
    return dict(_parsed())


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit name) of a module of the package, or `None` when no unit holds it."""
    inner = module.removeprefix(PACKAGE).removeprefix(".") or "__init__"
    best = None
    for index, units in enumerate(LAYERS):
        for unit, paths in units.items():
            for path in paths:
                if (inner == path or inner.startswith(path + ".")) and (best is None or len(path) > best[0]):
                    best = (len(path), index, unit)
    return None if best is None else best[1:]


def imports_of(module: str, tree: ast.Module, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package's own modules in ``tree``. ``from X import name``
    counts as an import of ``X.name`` when that is a module, else of ``X``."""
    base = module.split(".") if is_package else module.split(".")[:-1]  # what a relative import starts from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                found.append((node.lineno, f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target))
    return sorted(set(found))


def layering_violations(modules: dict[str, tuple[Path, ast.Module]]) -> list[str]:
    """One line per import that goes up the layers or across to another unit of its layer, and per module that no
    unit holds."""
    known = set(modules)
    problems = []
    for module, (path, tree) in sorted(modules.items()):
        source = unit_of(module)
        if source is None:
            problems.append(f"{module}: in no layer; add it to LAYERS in tests/test_layering.py (and say why in "
                            "docs/architecture.md)")
            continue
        for line, target in imports_of(module, tree, path.name == "__init__.py", known):
            goal = unit_of(target)
            if goal is None or goal[1] == source[1] or goal[0] < source[0]:
                continue
            where = "above it" if goal[0] > source[0] else "beside it (same layer)"
            problems.append(f"{path.relative_to(SOURCE.parent)}:{line}: {module} ({source[1]}, layer {source[0]}) "
                            f"imports {target} ({goal[1]}, layer {goal[0]}, {where})")
    return problems


def test_every_import_goes_down_the_layers():
    problems = layering_violations(package_modules())
    assert not problems, "imports against the layering (see docs/architecture.md):\n" + "\n".join(problems)


def test_every_layer_unit_names_modules_that_exist():
    modules = package_modules()
    for units in LAYERS:
        for unit, paths in units.items():
            for path in paths:
                name = PACKAGE if path == "__init__" else f"{PACKAGE}.{path}"
                assert name in modules, f"LAYERS unit {unit!r} names {path!r}, which is no module of the package"


@pytest.mark.parametrize(("module", "source", "expected"), [
    # a function-local import up the layers (the kind that hid the cycles), relative and absolute
    ("hf_compress_prompt.nn.packed_linear", "def f():\n    from ..integrations import hub\n",
     "hf_compress_prompt.integrations.hub (integrations, layer 5, above it)"),
    ("hf_compress_prompt.kernels.ops", "import hf_compress_prompt.nn\n",
     "hf_compress_prompt.nn (nn, layer 3, above it)"),
    ("hf_compress_prompt.recovery.runtime", "from ..recovery.train import recover\n", "(recovery training, layer 8"),
    ("hf_compress_prompt.formats.packing", "from ..methods import rtn\n", "(methods, layer 1, beside it"),
    ("hf_compress_prompt.data.corpora", "from .. import load_text\n", "imports hf_compress_prompt (package"),
    ("hf_compress_prompt.shiny_new", "", "hf_compress_prompt.shiny_new: in no layer"),
])
def test_the_check_finds_an_import_against_the_layering(module, source, expected):
    modules = package_modules()
    path = SOURCE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    modules[module] = (path, ast.parse(source))
    problems = layering_violations(modules)
    assert len(problems) == 1 and expected in problems[0], problems


def test_imports_down_the_layers_and_within_a_unit_pass():
    modules = package_modules()
    path = SOURCE / "recovery" / "train.py"
    modules["hf_compress_prompt.recovery.train"] = (path, ast.parse(
        "from ..integrations import hub\nfrom .distill import check_teacher\nfrom ..recovery import runtime\n"))
    assert layering_violations(modules) == []


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop (module top and function-local imports alike;
    an import of a package goes to its ``__init__``)."""
    modules = package_modules()
    known = set(modules)
    graph = {m: {t for _, t in imports_of(m, tree, path.name == "__init__.py", known) if t in known and t != m}
             for m, (path, tree) in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
