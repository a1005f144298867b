"""The floor plan: every import in gpuconv points down, and no package ``__init__`` runs anything.

Read from the source, not from a running interpreter: every ``import`` and ``from ... import``
in a module counts, at module level or inside a function (a lazy import is still an arrow),
relative imports resolved; so does a ``"gpuconv.module:name"`` string, the form in which
:mod:`gpuconv.ops` names the kernels it resolves on first use. Importing a submodule imports
its parent package first; that arrow is Python's, not the module's, and is not counted.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gpuconv"


def _modules():
    """``{dotted name: (path, is a package __init__)}`` for every module in gpuconv/."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


MODULES = _modules()
_NAMED_FUNCTION = re.compile(r"gpuconv(\.\w+)*:\w+")  # "module:function", as ops names kernels


def _target(name):
    """The module a dotted name refers to: itself, or the module that defines it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name):
    """The gpuconv modules ``name`` imports, anywhere in its source."""
    path, is_package = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                found.add(_target(f"{module}.{alias.name}") or _target(module))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _NAMED_FUNCTION.fullmatch(node.value)):
            found.add(_target(node.value.partition(":")[0]))
    found.discard(None)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph):
    """Every strongly connected group of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_the_checker_sees_lazy_relative_and_string_imports():
    # The arrows the checker must see, or it could pass on a cyclic package.
    assert "gpuconv.cpu.conv2d" in GRAPH["gpuconv.ops"]  # a "module:function" string
    assert "gpuconv.cuda.launch" in GRAPH["gpuconv.conv"]  # inside a function
    assert "gpuconv.cpu.simd" in GRAPH["gpuconv.cpu.conv2d"]  # relative, one level
    assert "gpuconv.geometry" in GRAPH["gpuconv.cpu.conv2d_grad"]  # relative, two levels
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


# What a package __init__ may hold: its docstring, imports, the names it exports, and a
# module-level __getattr__ that hands out a submodule's names (a lazy re-export).
_EXPORT_NAMES = {"__all__", "__version__"}


def _runs_something(statement):
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return False
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return False  # the docstring
    if isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        return not all(isinstance(t, ast.Name) and t.id in _EXPORT_NAMES for t in targets)
    if isinstance(statement, ast.FunctionDef) and statement.name == "__getattr__":
        return False
    return True


@pytest.mark.parametrize("name", sorted(n for n, (_, package) in MODULES.items() if package))
def test_package_init_only_names_its_exports(name):
    path, _ = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    extra = [f"line {s.lineno}: {ast.unparse(s).splitlines()[0]}"
             for s in tree.body if _runs_something(s)]
    assert extra == [], f"{path.relative_to(ROOT)} should only import and export"
    # ... and a lazy re-export reaches only into the package itself (downward).
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef):
            for target in _imports_in(statement, name):
                assert target.startswith(name + "."), (name, target)


def _imports_in(function, package):
    """``module.name`` for every name a function imports (relative imports resolved)."""
    for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            yield from (f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _readme_tree():
    """The modules of the README's layout tree, in the order it lists them."""
    text = (ROOT / "README.md").read_text()
    tree = text.split("### The layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    order, folders = [], []
    for line in tree.splitlines()[1:]:
        match = re.match(r"^((?:│   |    )*)[├└]── (\S+)", line)
        if not match:
            continue  # a description's second line
        depth, entry = len(match.group(1)) // 4, match.group(2)
        del folders[depth:]
        if entry.endswith("/"):
            folders.append(entry[:-1])
            continue
        parts = ["gpuconv", *folders]
        if entry != "__init__.py":
            parts.append(entry.removesuffix(".py"))
        order.append(".".join(parts))
    return order


def test_the_readme_tree_lists_every_module_in_an_order_the_imports_allow():
    order = _readme_tree()
    assert sorted(order) == sorted(MODULES)
    for position, name in enumerate(order):
        later = set(GRAPH[name]) - set(order[:position])
        assert not later, f"{name} imports {sorted(later)}, listed after it in README.md"
