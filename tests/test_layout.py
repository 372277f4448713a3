"""The layout: the paper's files at the top, the plumbing, the evaluation, the worlds and course mode in their own
folders; imports flow one way (no cycle, none hidden inside a function); the core files a teacher hands out alone
import nothing of the project; no script calls another's main; every file says what it holds, no function runs
past a screen (60 lines) and no line past 100 characters."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("plumbing", "evaluation", "worlds", "course")
TOP = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
MODULES = TOP + list(PACKAGES) + sorted(f"{p}.{f[:-3]}" for p in PACKAGES for f in os.listdir(os.path.join(ROOT, p))
                                        if f.endswith(".py") and f != "__init__.py")
PAPER = {"model", "value", "control", "generate", "rollouts", "train_value", "recontrol", "compare"}
CORE = ("model", "value", "control")  # torch and the standard library only
SCRIPTS = ("generate", "train_value", "recontrol", "compare", "course.assignment")
BENCHMARKS = sorted(f"benchmarks.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                    if f.endswith(".py"))


def path_of(module):
    if module in PACKAGES:
        return os.path.join(ROOT, module, "__init__.py")
    return os.path.join(ROOT, *module.split(".")) + ".py"


def project_imports(module):
    """{module of ours that `module` imports: whether at the top level}, read from its source."""
    tree = ast.parse(open(path_of(module)).read())
    top = set(map(id, tree.body))
    found = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            names = submodules or [node.module]  # `from worlds import toy` imports worlds.toy
        for name in names:
            name = name if name in MODULES else name.split(".")[0] if name.split(".")[0] in MODULES else None
            if name is not None and name != module:
                found[name] = found.get(name, True) and id(node) in top
    return found


def test_the_top_level_holds_the_paper():
    assert set(TOP) == PAPER, f"top-level modules: {TOP}; the method's files only (plumbing goes in a package)"


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
    for core in CORE:
        assert not graph[core], f"{core}.py imports {sorted(graph[core])}: a core file imports nothing of ours"
    for m, deps in graph.items():
        assert not set(deps) & {"recontrol", "compare", "course.assignment"}, f"{m} imports a script"


def test_no_script_calls_another_scripts_main():
    for m in MODULES:
        for node in ast.walk(ast.parse(open(path_of(m)).read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "main":
                owner = node.func.value
                assert not (isinstance(owner, ast.Name) and owner.id in [s.split(".")[-1] for s in SCRIPTS]), m


def test_files_say_what_they_hold_and_functions_and_lines_stay_short():
    for m in MODULES + BENCHMARKS:
        source = open(path_of(m)).read()
        tree = ast.parse(source)
        assert ast.get_docstring(tree), f"{m} has no docstring naming its idea"
        long_lines = [i for i, line in enumerate(source.splitlines(), 1) if len(line) > 100]
        assert not long_lines, f"{m}: lines {long_lines} are longer than 100 characters"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{m}.{node.name} has {length} lines (at most 60: split it)"
