"""The store registry: a new backend is one module and one line, and everything else (the map
types settings accept, the --map help, the class that opens a map) follows from that line."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policyd import stores
from policyd.config import ConfigError, load_settings
from tests.helpers import ROOT

# A complete backend: a store of owners written inline, memory:ADDRESS=OWNER[;...].
MEMORY_MODULE = '''"""memory:ADDRESS=OWNER[;...]: owners written in the map setting itself."""

from typing import Literal

from policyd.model import Entry, Hit, Origin
from policyd.stores.base import MemoryStore, StoreContext, StoreOptions


class MemoryOptions(StoreOptions):
    type: Literal["memory"]
    entries: str


class InlineStore(MemoryStore):
    Options = MemoryOptions
    location = "entries"
    location_help = "ADDRESS=OWNER;..."

    def __init__(self, entries: str, context: StoreContext) -> None:
        super().__init__(f"memory:{entries}", context)
        self.owners = dict(item.split("=", 1) for item in entries.split(";"))

    @classmethod
    def from_options(cls, options: MemoryOptions, context: StoreContext) -> "InlineStore":
        return cls(options.entries, context)

    async def start(self) -> None:
        self.status.loaded(len(self.owners), ())

    def find(self, key: str) -> Hit | None:
        owner = self.owners.get(key)
        return None if owner is None else Hit(key, (Entry((owner,), Origin(self.name)),))
'''

LAST_LINE = '    Backend("regexp", "policyd.stores.files:RegexpStore"),\n'


def with_backend(tmp_path: Path, line: str, module: str = MEMORY_MODULE) -> Path:
    """A copy of the policyd package with one more backend module and one more line."""
    shutil.copytree(
        ROOT / "policyd", tmp_path / "policyd", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "policyd" / "stores" / "memory.py").write_text(module)
    registry = tmp_path / "policyd" / "stores" / "__init__.py"
    text = registry.read_text()
    assert LAST_LINE in text, "the registration table changed shape; update this test"
    registry.write_text(text.replace(LAST_LINE, LAST_LINE + line))
    return tmp_path


def policyd(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyd", *args],
        cwd=where,
        env={**os.environ, "PYTHONPATH": str(where), "POLICYD_METRICS_LISTEN": "none"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def changed_lines(original: Path, copy: Path) -> list[str]:
    """Every line that differs between two package trees, as +/- diff lines."""
    changes = []
    for path in sorted(copy.rglob("*.py")):
        relative = path.relative_to(copy)
        before = (
            (original / relative).read_text().splitlines() if (original / relative).exists() else []
        )
        after = path.read_text().splitlines()
        changes += [
            line
            for line in difflib.unified_diff(before, after, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
    return changes


def test_a_new_backend_is_one_module_and_one_line(tmp_path: Path) -> None:
    line = '    Backend("memory", "policyd.stores.memory:InlineStore"),\n'
    copy = with_backend(tmp_path, line)
    module_lines = MEMORY_MODULE.count("\n")
    assert len(changed_lines(ROOT / "policyd", copy / "policyd")) == module_lines + 1

    checked = policyd(copy, "check", "--map", "memory:a@x=b@x", "b@x", "a@x")
    assert checked.returncode == 0, checked.stderr
    assert "verdict: permit" in checked.stdout
    assert "rule:    memory:a@x=b@x" in checked.stdout

    refused = policyd(copy, "check", "--map", "memory:a@x=b@x", "c@x", "a@x")
    assert refused.returncode == 1
    assert "action:  553 5.7.1 not owned by user c@x" in refused.stdout

    helped = policyd(copy, "serve", "--help")
    assert "memory:ADDRESS=OWNER;..." in " ".join(helped.stdout.split())

    validated = policyd(copy, "validate", "--map", "memory:a@x=b@x", "--map", "dms:/nowhere")
    assert "map memory:a@x=b@x: 1 entries" in validated.stdout
    assert "map dms:/nowhere: FAILED" in validated.stdout
    assert validated.returncode == 78

    unknown = policyd(copy, "check", "--map", "memroy:a@x=b@x", "b@x", "a@x")
    assert unknown.returncode == 78
    names = [backend.name for backend in stores.BACKENDS]
    known = [*names[: names.index("regexp") + 1], "memory", *names[names.index("regexp") + 1 :]]
    assert f"unknown map type 'memroy' (known: {', '.join(known)})" in unknown.stderr


def test_a_missing_optional_package_is_one_line_naming_what_to_install(tmp_path: Path) -> None:
    line = (
        '    Backend("memory", "policyd.stores.memory:InlineStore",'
        ' requires={"policyd_no_such_client": "memory"}),\n'
    )
    copy = with_backend(tmp_path, line)
    result = policyd(copy, "check", "--map", "memory:a@x=b@x", "b@x", "a@x")
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "policyd: memory:: map type 'memory' needs the Python package 'policyd_no_such_client':"
        " pip install 'policyd[memory]'"
    ]


def test_an_import_error_inside_a_store_module_is_not_masked(tmp_path: Path) -> None:
    """A bug (here: a misspelt import) must show as the bug it is, not as a missing extra."""
    broken = MEMORY_MODULE.replace("from typing import Literal", "from typing import Literl")
    line = '    Backend("memory", "policyd.stores.memory:InlineStore", requires={"json": "x"}),\n'
    copy = with_backend(tmp_path, line, module=broken)
    result = policyd(copy, "check", "--map", "memory:a@x=b@x", "b@x", "a@x")
    assert result.returncode != 0
    assert "ImportError: cannot import name 'Literl' from 'typing'" in result.stderr
    assert "pip install" not in result.stderr


def test_every_registered_type_is_accepted_by_the_settings_and_the_help() -> None:
    names = list(stores.backends())
    assert names == [backend.name for backend in stores.BACKENDS]
    for name in names:
        cls = stores.store_class(name)
        assert cls.Options.model_fields.keys() >= {"type", cls.location}
        settings = load_settings(environ={}, flags={"maps": [f"{name}:/some/where"]})
        assert settings.maps[0].type == name
        assert f"{name}:{cls.location_help}" in stores.map_types_help()


def test_an_unknown_map_type_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown map type 'ldapp' \(known: dms, texthash"):
        load_settings(environ={}, flags={"maps": ["ldapp:/etc/postfix/x.cf"]})
