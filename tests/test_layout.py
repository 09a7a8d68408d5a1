"""The shape of the package stays readable: small modules, and commands that only parse options
and call the library (issue #18's limits)."""

from __future__ import annotations

import ast
from pathlib import Path

import rwkv_cli

PACKAGE = Path(rwkv_cli.__file__).parent
MOST_LINES_PER_MODULE = 450
MOST_LINES_PER_COMMAND = 65


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_450_lines() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in _modules()}
    too_long = {
        str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > MOST_LINES_PER_MODULE
    }
    assert not too_long, f"split these by concern: {too_long}"


def test_every_command_function_is_short() -> None:
    """A command parses its options and calls the library; logic lives in library modules."""
    from rwkv_cli.cli import app

    commands = [info.callback for info in app.registered_commands]
    assert len(commands) == 11
    too_long = {}
    for command in commands:
        source = Path(command.__code__.co_filename).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == command.__name__:
                length = node.end_lineno - node.lineno + 1
                if length > MOST_LINES_PER_COMMAND:
                    too_long[command.__name__] = length
    assert not too_long, f"move logic out of these commands: {too_long}"
