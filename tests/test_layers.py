"""The package's layers: the product core never imports the research tools (``leukoscope.research``), the command
line's parser imports neither them nor PyTorch, and ``leukoscope.models`` imports nothing from the layers above it
(``leukoscope.train``, ``leukoscope.evaluate``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import leukoscope

PACKAGE = Path(leukoscope.__file__).resolve().parent
RESEARCH = "leukoscope.research"
ABOVE_MODELS = ("leukoscope.train", "leukoscope.evaluate")


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> list[str]:
    """Every module of leukoscope but the research tools, the command line (a command's ``main`` may import them)
    and ``__main__`` (it runs the command line). Found on disk: walking the package would import what it lists."""
    names = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))
    return [n for n in names if not _is_under(n, RESEARCH) and not _is_under(n, "leukoscope.cli")
            and n != "leukoscope.__main__"]


def _run(script: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


IMPORT_EACH = """
    import importlib, json, sys

    def research():
        return {m for m in sys.modules if m == "leukoscope.research" or m.startswith("leukoscope.research.")}

    brought = {}
    for name in sys.argv[1:]:
        before = research()
        importlib.import_module(name)
        if research() - before:
            brought[name] = sorted(research() - before)
    print(json.dumps(brought))
"""


def test_no_product_module_imports_the_research_tools():
    modules = product_modules()
    # the scan sees the whole core (not an empty list) and leaves out exactly the research tools and the CLI
    assert {"leukoscope", "leukoscope.models.modeldir", "leukoscope.scan", "leukoscope.quantize",
            "leukoscope.explain.record", "leukoscope.diagnose.core", "leukoscope.train.trainer",
            "leukoscope.serve.app"} <= set(modules)
    assert not [m for m in modules if _is_under(m, RESEARCH) or _is_under(m, "leukoscope.cli")]
    brought = _run(IMPORT_EACH, *modules)
    assert brought == {}, "product modules that import leukoscope.research (move the code, or import it lazily " \
                          f"where only a research feature needs it): {brought}"


def test_the_command_line_parser_imports_no_research_tool_and_no_torch():
    found = _run("""
        import json, sys
        from leukoscope.cli import build_parser
        build_parser()  # what `leukoscope --help` and every command pay before they run
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch"
                                or m == "leukoscope.research" or m.startswith("leukoscope.research."))))
    """)
    assert found == [], f"building the parser imported {found}: import them inside the command's main()"


# ---------------------------------------------------------------------------------------- models: no import up
def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` at any depth (inside functions and ``TYPE_CHECKING`` blocks too):
    relative imports resolved against ``package``, ``from a import b`` counted as ``a`` and ``a.b``, and
    ``import_module("...")`` with a literal name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[:len(parts) - node.level + 1] + ([module] if module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def _up_a_layer(path: Path) -> list[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    return [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
            for line, module in imported_names(path.read_text(), package)
            if any(_is_under(module, above) for above in ABOVE_MODELS)]


def test_models_import_nothing_from_train_or_evaluate():
    files = sorted((PACKAGE / "models").rglob("*.py"))
    assert PACKAGE / "models" / "modeldir.py" in files
    bad = [hit for f in files for hit in _up_a_layer(f)]
    assert bad == [], "leukoscope.models imports a layer above it (move the code down, or the function up): " \
                      + "; ".join(bad)


def test_the_scan_finds_every_form_of_an_upward_import():
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        import leukoscope.evaluate.metrics
        from leukoscope import train
        from ..evaluate import run
        from . import net
        if TYPE_CHECKING:
            from leukoscope.train.trainer import train as _train
        def f():
            from leukoscope.train.stem_cache import cache_root
            import importlib
            return importlib.import_module("leukoscope.evaluate.report")
    """)
    up = sorted({(line, m) for line, m in imported_names(source, "leukoscope.models")
                 if any(_is_under(m, a) for a in ABOVE_MODELS)})
    assert up == [(3, "leukoscope.evaluate.metrics"), (4, "leukoscope.train"), (5, "leukoscope.evaluate"),
                  (5, "leukoscope.evaluate.run"), (8, "leukoscope.train.trainer"),
                  (8, "leukoscope.train.trainer.train"), (10, "leukoscope.train.stem_cache"),
                  (10, "leukoscope.train.stem_cache.cache_root"), (12, "leukoscope.evaluate.report")]
    assert (6, "leukoscope.models.net") in imported_names(source, "leukoscope.models")  # same layer: allowed
