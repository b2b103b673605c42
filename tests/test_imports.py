"""The package's import graph: no cycles, and the command line starts light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import openbagel

PACKAGE = Path(openbagel.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Each openbagel module -> the openbagel modules it imports, at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_cycles():
    # function-level imports count too: a lazy import that only hides a cycle is still a cycle
    assert _find_cycle(_import_graph()) is None


def test_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys; from typer.testing import CliRunner; from openbagel.cli import app; "
        "assert CliRunner().invoke(app, ['generate', '--help']).exit_code == 0; "
        "print(sorted(m for m in ('gradio', 'fastapi', 'uvicorn', 'torchao', 'bitsandbytes', 'diffusers', 'ray') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_quiet_imports_silence_only_the_libraries(caplog):
    """While a thread imports the optional libraries quietly, another thread's
    log lines still come out (the server's request lines were lost while the
    model loaded: logging.disable acted on the whole process); the libraries'
    own records below ERROR are dropped."""
    import logging
    import threading

    from openbagel.quiet import quiet_imports

    inside, done = threading.Event(), threading.Event()

    def importer():
        with quiet_imports():
            logging.getLogger("torchao.kernel").warning("cannot load a CUDA extension")
            inside.set()
            done.wait(10)

    worker = threading.Thread(target=importer)
    with caplog.at_level(logging.INFO):
        worker.start()
        assert inside.wait(10)
        logging.getLogger("openbagel.serve").info("req-1 GET /ready 503")
        done.set()
        worker.join()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["req-1 GET /ready 503"]
    assert logging.getLogger("torchao").level == logging.NOTSET  # restored after the block
