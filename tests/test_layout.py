"""The layout: every file of the project imports only files above it in one order (no cycle, none hidden inside a
function), no file grows past ~450 lines, and each opens with a docstring that names its one idea."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(name):
    """{module of ours that `name` imports: whether at the top level}, read from its source."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    top = set(map(id, tree.body))
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for n in names:
            if n in MODULES:
                found[n] = found.get(n, True) and id(node) in top
    return found


def test_imports_flow_one_way():
    graph = {m: project_imports(m) for m in MODULES}
    hidden = [(m, n) for m, deps in graph.items() for n, at_top in deps.items() if not at_top]
    assert not hidden, f"imports of project files inside functions (they hide cycles): {hidden}"
    order, visiting = [], set()

    def visit(m, path):
        if m in order:
            return
        assert m not in visiting, f"import cycle: {' -> '.join(path + [m])}"
        visiting.add(m)
        for n in graph[m]:
            visit(n, path + [m])
        visiting.discard(m)
        order.append(m)

    for m in MODULES:
        visit(m, [])
    assert order.index("model") < order.index("generate") < order.index("train_value") < order.index("recontrol")
    assert not graph["model"], "model.py is the bottom of the house: it imports nothing of ours"


def test_files_are_short_and_say_what_they_hold():
    for name in MODULES:
        source = open(os.path.join(ROOT, f"{name}.py")).read()
        assert len(source.splitlines()) <= 450, f"{name}.py has {len(source.splitlines())} lines"
        assert ast.get_docstring(ast.parse(source)), f"{name}.py has no docstring naming its idea"
