"""The public Python API: the names ``rwkv_cli`` exports, and the README's example, run as is."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import rwkv_cli

README = Path(__file__).parents[1] / "README.md"


def _readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # it writes a state file
    exec(compile(_readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip() and (tmp_path / "said.rwkvstate").is_file()


def test_every_exported_name_resolves_to_what_it_names() -> None:
    importlib.import_module("rwkv_cli.generation")  # every module loaded: none hides a name
    for name in rwkv_cli.__all__:
        assert not isinstance(getattr(rwkv_cli, name), types.ModuleType), name
    assert rwkv_cli.stream_generate is sys.modules["rwkv_cli.generation"].stream_generate
    assert set(rwkv_cli.__all__) == {"__version__", *rwkv_cli._EXPORTS}


def test_importing_the_package_loads_no_torch() -> None:
    script = "import sys, rwkv_cli; rwkv_cli.__all__; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
