"""The package's floors: every module imports only modules below it (lower floors, and earlier
modules of its own floor), so the import graph has no circle and no import climbs back up.
Read from the source with `ast`, every import counted: top-level, inside functions, and under
`TYPE_CHECKING`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lazymerge

PACKAGE = Path(lazymerge.__file__).parent

#: Each floor's modules, lowest first, in the order they may import each other.
FLOORS: list[tuple[str, list[str]]] = [
    ("ground", ["_version", "errors", "_optional", "progress", "memory", "magnitude_select", "methods"]),
    (
        "io",
        [
            "io",
            "io.dtypes",
            "io.small_files",
            "io.header",
            "io.hub_cache",
            "io.hf_folder",
            "io.torch_bin",
            "io.reader",
            "io.outputs",
            "io.writer",
            "verify",
            "inspect",
        ],
    ),
    (
        "options and provenance",
        ["options", "score_options", "sweep_options", "provenance", "mergekit_config"],
    ),
    (
        "merge",
        [
            "merge",
            "merge.tensor_plan",
            "merge.workspace",
            "merge.recipe",
            "merge.layer_stack",
            "merge.preflight",
            "merge.plan",
            "merge.card",
            "merge.engine",
            "merge.api",
        ],
    ),
    (
        "evaluation",
        [
            "evaluation",
            "evaluation.stats",
            "evaluation.sections",
            "evaluation.rewardbench2",
            "evaluation.datasets",
            "evaluation.conversations",
            "evaluation.scoring",
            "evaluation.convert",
            "evaluation.template_sandbox",
            "evaluation.chat_templates",
            "evaluation.fastchat_templates",
            "evaluation.token_rules",
            "evaluation.prefix_scoring",
            "evaluation.stream_prefix",
            "evaluation.layer_stream",
            "evaluation.rewards",
            "evaluation.in_memory",
            "evaluation.resident",
            "evaluation.reports",
            "evaluation.diagnostics",
            "evaluation.lm_check",
            "evaluation.report",
            "evaluation.run",
            "evaluation.sweep",
            "evaluation.ray_sweep",
        ],
    ),
    (
        "commands",
        [
            "demo",
            "check",
            "cli.group",
            "cli.flags",
            "cli.merge",
            "cli.evaluate",
            "cli.diagnose",
            "cli.data",
            "cli.check",
            "cli",
            "__main__",
            "",
        ],
    ),
]
ORDER = [m for _, modules in FLOORS for m in modules]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, text: str | None = None) -> list[tuple[str, int]]:
    """(module of the package it imports, line) for every import in `path` (or in `text`, read
    as that module): `lazymerge.X.Y` as `X.Y` (the package root as ""), `from lazymerge.X
    import Y` as `X.Y` when Y is a module."""
    modules = set(ORDER)
    found = []
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                absolute = ".".join(["lazymerge", *base, *([node.module] if node.module else [])])
            else:
                absolute = node.module or ""
            names = [(absolute, a.name) for a in node.names]
        else:
            continue
        for module, member in names:
            if module != "lazymerge" and not module.startswith("lazymerge."):
                continue
            inner = module.removeprefix("lazymerge").removeprefix(".")
            if member is not None and (f"{inner}.{member}" if inner else member) in modules:
                inner = f"{inner}.{member}" if inner else member
            found.append((inner, node.lineno))
    return found


def test_every_module_has_a_floor() -> None:
    present = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert present == set(ORDER), (
        f"modules without a floor: {sorted(present - set(ORDER))}; listed but gone: {sorted(set(ORDER) - present)}"
    )


def test_imports_only_point_down() -> None:
    rank = {m: i for i, m in enumerate(ORDER)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = module_name(path)
        for target, line in imports_of(path):
            if target == own:
                continue
            if target not in rank:
                upward.append(f"{path.name}:{line} imports lazymerge.{target}, which has no floor")
            elif rank[target] > rank[own]:
                upward.append(
                    f"{own or 'lazymerge'} ({path.name}:{line}) imports {target or 'lazymerge'}, above it"
                )
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_package_root() -> None:
    """The root only re-exports; a module that imports it pulls in the whole merge API."""
    offenders = [
        f"{module_name(path)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "__init__.py"
        for target, line in imports_of(path)
        if target == ""
    ]
    assert not offenders, offenders


def test_the_check_sees_every_kind_of_import() -> None:
    """Imports inside a function, under TYPE_CHECKING, relative, and of the root are all seen."""
    text = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lazymerge.merge.plan import MergePlan\n"
        "def f():\n    from lazymerge import cli, __version__\n    import lazymerge.evaluation.sweep\n"
        "    from .reader import Checkpoint\n"
    )
    found = [t for t, _ in imports_of(PACKAGE / "io" / "writer.py", text)]
    assert found == ["merge.plan", "cli", "", "evaluation.sweep", "io.reader"]


def test_help_loads_no_torch() -> None:
    code = "import sys; from lazymerge.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_test_module_imports_another() -> None:
    """Shared builders live in tests/helpers; a test module importing another (or the
    conftest) runs that module's imports and fixtures for nothing, and ties the two together."""
    tests = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            leaves = [(n, n.rpartition(".")[2]) for n in names]
            offenders += [
                f"{path.relative_to(tests)}:{node.lineno} imports {n}"
                for n, leaf in leaves
                if leaf.startswith("test_") or leaf == "conftest"
            ]
    assert not offenders, offenders


def test_tests_mirror_the_package() -> None:
    """Every test module sits in the folder of the floor it tests, and conftest.py holds
    fixtures only (anything else a test needs is a helper, imported by name)."""
    tests = Path(__file__).resolve().parents[1]
    folders = {"io", "merge", "evaluation", "cli", "system"}
    misplaced = [
        str(p.relative_to(tests))
        for p in sorted(tests.rglob("test_*.py"))
        if p.parent.parent != tests or p.parent.name not in folders
    ]
    assert not misplaced, f"test modules outside tests/{sorted(folders)}: {misplaced}"
    conftest = ast.parse((tests / "conftest.py").read_text())
    plain = [
        node.name
        for node in conftest.body
        if isinstance(node, ast.FunctionDef)
        and not any("fixture" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert not plain, f"conftest.py defines functions that are not fixtures: {plain}"
