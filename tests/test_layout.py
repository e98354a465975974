"""The package's shape: no import cycles, a pure core, light client verbs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dispatcher"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every dispatcher module ``path`` imports at run time, lazily or not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in modules:
                    found.add(candidate)
                elif base in modules:
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    found.discard("dispatcher")  # the package root holds only the version
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(files)
    return {name: _imports(path, names) for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    """No module of the package imports, directly or through others, a module that imports it."""
    cycle = _find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


# The rooms only the daemon needs: a client verb or a config check must not load them.
DAEMON_MODULES = (
    "dispatcher.app",
    "dispatcher.scheduler",
    "dispatcher.providers",
    "dispatcher.ingress",
    "dispatcher.store",
    "dispatcher.testing",
)


# The socket client writes its lines with the server's line writer and reads the
# listener's uid with the same helper.
SHARED_WITH_CLIENTS = {
    "dispatcher.ingress",
    "dispatcher.ingress.line_writer",
    "dispatcher.ingress.unix",
}


def _daemon_modules(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.startswith(DAEMON_MODULES)} - SHARED_WITH_CLIENTS


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_loading_a_config_imports_no_daemon(tmp_path: Path) -> None:
    """Parsing a config with listen addresses loads neither aiohttp nor the daemon's actors."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[http]\nlisten = "127.0.0.1:8080"\nallow_anonymous = true\n'
        '[metrics]\nlisten = "127.0.0.1:9464"\n'
    )
    loaded = _loaded_after(
        f"from dispatcher.contract.config import load_config; load_config(__import__('pathlib').Path({str(config)!r}))"
    )
    assert "aiohttp" not in loaded
    assert _daemon_modules(loaded) == set()


def test_client_verbs_import_no_daemon(tmp_path: Path) -> None:
    """`dispatcher status --config FILE` with no daemon running loads neither aiohttp nor the daemon."""
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nsocket = "{tmp_path / "none.sock"}"\n')
    loaded = _loaded_after(
        "from dispatcher import cli\n"
        "try:\n"
        f"    cli.main(['status', '--config', {str(config)!r}])\n"
        "except SystemExit:\n"
        "    pass"
    )
    assert "aiohttp" not in loaded
    assert _daemon_modules(loaded) == set()


def test_the_daemon_loads_no_fakes() -> None:
    """The daemon's own modules load the simulator only when --simulate asks for it."""
    loaded = _loaded_after("import dispatcher.app")
    assert not {m for m in loaded if m.startswith(("dispatcher.testing", "dispatcher.tools"))}
