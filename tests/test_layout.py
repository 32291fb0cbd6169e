"""The import plan: within `omni/` no circle, no import hidden inside a function, and few floors; between
the project's packages, only the imports PLAN allows, in one direction.

A module's floor is 0 if it imports no other `omni` module, else one more than the highest floor it
imports; so every import goes down. Read from the source with `ast`, without importing anything.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "omni"
MAX_FLOOR = 6  # `omni/__init__.py`, the surface, on top of the engine (5)


def modules() -> dict[str, Path]:
    return {path.stem: path for path in PACKAGE.glob("*.py")}


def imported(node: ast.AST, names: set[str]) -> set[str]:
    """The `omni` modules one import statement names: `from .x import y`, `from . import x`, `import omni.x`."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or node.module == PACKAGE.name or (node.module or "").startswith(PACKAGE.name + "."):
            base = (node.module or "").removeprefix(PACKAGE.name).lstrip(".")
            if base:
                return {base.split(".")[0]} & names
            return {alias.name for alias in node.names} & names
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE.name + ".")} & names
    return set()


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per module: the modules it imports at its top level, and those it imports inside a function or class."""
    names = set(modules())
    top, nested = {}, {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        top[name] = set().union(*(imported(n, names) for n in tree.body))
        every = set().union(*(imported(n, names) for n in ast.walk(tree)))
        nested[name] = every - top[name]
    return top, nested


def floors(top: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor; fails on a circle."""
    out: dict[str, int] = {}

    def floor(name: str, path: tuple[str, ...]) -> int:
        assert name not in path, f"import circle: {' -> '.join(path + (name,))}"
        if name not in out:
            out[name] = 1 + max((floor(dep, path + (name,)) for dep in top[name] - {name}), default=-1)
        return out[name]

    for name in top:
        floor(name, ())
    return out


def test_no_module_imports_omni_inside_a_function():
    _, nested = graph()
    assert {name: deps for name, deps in nested.items() if deps} == {}


def test_no_circle_and_every_import_goes_down():
    top, _ = graph()
    level = floors(top)
    for name, deps in top.items():
        for dep in deps:
            assert level[dep] < level[name], f"{name} (floor {level[name]}) imports {dep} (floor {level[dep]})"
    assert max(level.values()) <= MAX_FLOOR, sorted(level.items(), key=lambda item: item[1])


# The plan between the project's packages and top-level modules: each may import only those it lists.
ENTRY_POINTS = ("inference", "server", "realtime_vad_player", "demo_snac_token_decode", "bench", "examples")
PLAN = {
    "omni": set(),  # the core: nothing of the project
    "omni_engine": {"omni"},  # the public facade
    "voice": {"omni"},  # the turn-taking core
    "serving": {"omni", "voice"},  # the server
    "webui": {"serving"},  # the pages: clients of the server (its wire facts and security names only)
    "utils": {"omni", "omni_engine", "voice", "serving"},  # developer tools and the entry points' WAV helper
    **{name: {"omni", "omni_engine", "voice", "serving", "utils"} for name in ENTRY_POINTS},
}


def project_imports() -> dict[str, set[str]]:
    """Per package (or top-level module): the other packages and top-level modules of the project it imports."""
    root = PACKAGE.parent
    out: dict[str, set[str]] = {name: set() for name in PLAN}
    for name in PLAN:
        paths = [root / f"{name}.py"] if (root / f"{name}.py").is_file() else list((root / name).rglob("*.py"))
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out[name].add(node.module.split(".")[0])
                elif isinstance(node, ast.Import):
                    out[name].update(alias.name.split(".")[0] for alias in node.names)
        out[name] = (out[name] & set(PLAN)) - {name}
    return out


def test_packages_import_only_what_the_plan_allows():
    found = project_imports()
    assert {name: deps - PLAN[name] for name, deps in found.items() if deps - PLAN[name]} == {}


def test_the_plan_has_no_circle():
    floors({name: deps for name, deps in PLAN.items()})
