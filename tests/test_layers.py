"""The package's layers: imports go one way, down (README, "Layout").

Every module of ``gsr_plugin`` has a layer; a module may import from its own layer or
below, never from above, and no modules import each other in a circle. The math
(``walsh``, ``learn/``) imports nothing but the standard library, torch and tqdm, and
``serving/vllm_worker.py`` (run inside vLLM's environment) nothing of this package.
Imports inside functions count: they run too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gsr_plugin"

# module prefix -> layer, bottom up; the longest matching prefix decides
LAYERS = {
    "gsr_plugin.walsh": 0,  # math
    "gsr_plugin.learn": 1,  # learned parts, math
    "gsr_plugin.transform": 2,  # core: compressed-tensors and llm-compressor glue
    "gsr_plugin.mappings": 2,
    "gsr_plugin.session": 2,
    "gsr_plugin.saving": 2,
    "gsr_plugin.loading": 2,
    "gsr_plugin.checkpoint": 2,
    "gsr_plugin.rotation": 2,
    "gsr_plugin.calibration": 2,
    "gsr_plugin.recipes": 2,
    "gsr_plugin.quantizers": 2,
    "gsr_plugin.modifiers": 3,  # llm-compressor modifiers
    "gsr_plugin.eval": 4,  # product: measuring, other engines, serving
    "gsr_plugin.engines": 4,
    "gsr_plugin.serving": 4,
    "gsr_plugin.cli": 5,  # the command
}
FACE = ("gsr_plugin", 3)  # the package's __init__ alone: registers the modifiers, re-exports them
MATH = ("gsr_plugin.walsh", "gsr_plugin.learn")
MATH_MAY_IMPORT = {"torch", "tqdm"}
STANDALONE = ("gsr_plugin.serving.vllm_worker",)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, anywhere in it; ``from a import b``
    is module ``a.b`` where that is one of ``known``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def layer_of(module: str) -> int | None:
    if module == FACE[0]:
        return FACE[1]
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def violations(root: Path = PACKAGE) -> list[str]:
    """Every broken rule of the layout, as a sentence naming the file and line."""
    modules = modules_of(root)
    known = set(modules)
    out, graph = [], {}
    stdlib = set(sys.stdlib_module_names)
    for name, path in modules.items():
        where = path.relative_to(root.parent)
        mine = layer_of(name)
        if mine is None:
            out.append(f"{where}: {name} has no layer; add it to LAYERS in tests/test_layers.py (and README's layout)")
            continue
        graph[name] = set()
        for line, target in imports_of(path, name, known):
            top = target.split(".")[0]
            if name.startswith(MATH) and top not in stdlib and top not in MATH_MAY_IMPORT and top != "gsr_plugin":
                out.append(f"{where}:{line}: the math imports {target}; it takes only torch, tqdm and the standard library")
            if top != "gsr_plugin":
                continue
            if name in STANDALONE:
                out.append(f"{where}:{line}: imports {target}, but it runs inside vLLM's environment, without this package")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                out.append(f"{where}:{line}: {name} (layer {mine}) imports {target} (layer {theirs}), a layer above it")
            if target in known and target != name:
                graph[name].add(target)
    out += [f"circle of imports: {' -> '.join(c + [c[0]])}" for c in circles(graph)]
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_imports_only_down():
    problems = violations()
    assert not problems, "\n".join(problems)


def test_every_layer_named_is_a_module_of_the_package():
    modules = set(modules_of(PACKAGE))
    stale = [prefix for prefix in LAYERS if not any(m == prefix or m.startswith(prefix + ".") for m in modules)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "gsr_plugin" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "gsr_plugin"


@pytest.mark.parametrize(
    "files, expected",
    [
        # the circle this package had: the lifecycle imported one of its own users
        ({"rotation.py": "def rotate():\n    from gsr_plugin.modifiers.gsr import GSRModifier\n",
          "modifiers/__init__.py": "", "modifiers/gsr.py": "from gsr_plugin.rotation import rotate\n"},
         ["rotation.py:2: gsr_plugin.rotation (layer 2) imports gsr_plugin.modifiers.gsr (layer 3)", "circle of imports"]),
        # the arrows it had back up: eval/ and engines/ took the recipes from cli/
        ({"eval/__init__.py": "", "eval/diagnostics.py": "from gsr_plugin.cli.recipes import resolve_recipe\n",
          "cli/__init__.py": "", "cli/recipes.py": ""},
         ["eval/diagnostics.py:1: gsr_plugin.eval.diagnostics (layer 4) imports gsr_plugin.cli.recipes (layer 5)"]),
        ({"engines/__init__.py": "", "engines/optimum.py": "from ..cli import recipes\n",
          "cli/__init__.py": "", "cli/recipes.py": ""},
         ["engines/optimum.py:1: gsr_plugin.engines.optimum (layer 4) imports gsr_plugin.cli.recipes (layer 5)"]),
        ({"walsh.py": "import numpy\n"}, ["walsh.py:1: the math imports numpy"]),
        ({"learn/__init__.py": "", "learn/frtq.py": "from compressed_tensors import match_named_modules\n"},
         ["learn/frtq.py:1: the math imports compressed_tensors"]),
        ({"serving/__init__.py": "", "serving/vllm_worker.py": "from gsr_plugin.walsh import walsh_matrix\n"},
         ["vllm_worker.py:1: imports gsr_plugin.walsh, but it runs inside vLLM's environment"]),
        ({"newroom.py": ""}, ["gsr_plugin.newroom has no layer"]),
        ({"transform.py": "import torch\nfrom gsr_plugin.walsh import walsh_matrix\n", "walsh.py": "import math\n",
          "cli/__init__.py": "from gsr_plugin.eval import evaluate\n", "eval/__init__.py": "", "eval/evaluate.py": ""}, []),
    ],
)
def test_the_check_finds_what_breaks_the_layers(tmp_path, files, expected):
    problems = violations(write(tmp_path, {"__init__.py": "", **files}))
    for words in expected:
        assert any(words in p for p in problems), (words, problems)
    if not expected:
        assert problems == []
