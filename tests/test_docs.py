"""The documentation stands alone and cannot drift from the code.

- docs/config.md is exactly what `python -m proxy.config_doc` renders from the config's schema;
- every config field has a description (the generated page would show a blank otherwise);
- `joulegate config-schema` prints that schema;
- docs/reference.md names every command, flag, error code and pass-through path the code has;
- nothing a user reads points outside the repository (a clone has no ../shared, no issues).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import build_parser
from proxy.config import DEFAULT_PASSTHROUGH, Config, parse_config
from proxy.config_doc import EXAMPLE, REGENERATE, render

REPO = Path(__file__).resolve().parent.parent
READ_BY_USERS = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md",
                 *sorted((REPO / "docs").glob("*.md"))]
OUTSIDE = re.compile(r"\.\./shared|shared/design|shared/reference|\bissues? #?\d+|\bthe issue\b", re.IGNORECASE)


def test_config_md_is_generated_from_the_schema() -> None:
    on_disk = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert on_disk == render(), f"docs/config.md is stale: regenerate it with `{REGENERATE}` (or `make docs`)"


def _fields(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = [("Config." + name, node) for name, node in schema["properties"].items()]
    for model, sub in schema.get("$defs", {}).items():
        found += [(f"{model}.{name}", node) for name, node in sub.get("properties", {}).items()]
    return found


def test_every_config_field_has_a_description() -> None:
    missing = [name for name, node in _fields(Config.model_json_schema()) if not node.get("description")]
    assert not missing, f"give these fields a description= in proxy/config.py, then `{REGENERATE}`: {missing}"


def test_config_schema_command_prints_the_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy", "config-schema"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out) == Config.model_json_schema()


def test_the_config_example_is_valid() -> None:
    config = parse_config(EXAMPLE, "docs/config.md", env={"UPSTREAM_KEY": "k"})
    assert config.backends[0].power.source == "agent"


def _commands() -> dict[str, list[str]]:
    """`joulegate X` (and `trace synth`, `keys new`) -> its long flags."""
    found: dict[str, list[str]] = {}

    def walk(parser: Any, prefix: str) -> None:
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
        if prefix:
            found[prefix] = [s for a in parser._actions for s in a.option_strings
                             if s.startswith("--") and s != "--help"]

    walk(build_parser(), "")
    return found


def test_reference_names_every_command_and_flag() -> None:
    text = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    missing = []
    for command, flags in _commands().items():
        section = re.search(rf"^### `joulegate {re.escape(command)}\b.*?(?=^### |\Z)", text, re.M | re.S)
        if section is None:
            missing.append(f"### `joulegate {command}`")
            continue
        missing += [f"{command} {flag}" for flag in flags if f"`{flag}" not in section.group(0)]
    assert not missing, f"docs/reference.md lacks: {missing}"


def test_reference_names_every_error_code_and_passthrough_path() -> None:
    text = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    codes = set()
    for path in (REPO / "proxy").glob("*.py"):
        codes |= set(re.findall(r'code="([a-z_]+)"', path.read_text(encoding="utf-8")))
    assert {"insufficient_quota", "missing_api_key", "upstream_timeout"} <= codes
    missing = sorted(c for c in codes if f"`{c}`" not in text)
    missing += sorted(p for p in DEFAULT_PASSTHROUGH if f"`{p}`" not in text)
    assert not missing, f"docs/reference.md lacks: {missing}"


@pytest.mark.parametrize("path", READ_BY_USERS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pointer_outside_the_repository(path: Path) -> None:
    if not path.exists():
        pytest.fail(f"{path.relative_to(REPO)} is missing")
    hits = [f"line {n}: {line.strip()}" for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, (f"{path.relative_to(REPO)} points outside the repository (a clone has no ../shared and "
                      f"no issue tracker): restate the facts or link docs/reference.md: {hits}")


def test_the_outside_pattern_catches_what_it_must() -> None:
    for bad in ("See ../shared/design/contract.md", "from shared/reference/gpu-energy.md",
                "target (issue 5)", "as the issue's formula has it"):
        assert OUTSIDE.search(bad), bad
    for fine in ("a shared Redis", "exactly once", "issued keys"):
        assert not OUTSIDE.search(fine), fine


def test_energy_md_worked_example_is_what_the_code_computes() -> None:
    text = (REPO / "docs" / "energy.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/energy.md lost its worked example"
    scope: dict[str, Any] = {}
    exec(block.group(1), scope)  # the example as printed: its own imports and call
    claimed = re.search(r"# joules == (\{.*?\}), idle_j == ([0-9.]+)", block.group(1))
    assert claimed is not None
    assert scope["joules"] == pytest.approx(eval(claimed.group(1)), abs=1e-9)
    assert scope["idle_j"] == pytest.approx(float(claimed.group(2)), abs=1e-9)
    # The prose rounds the same figures to 3 decimals.
    for figure in ("214.286", "85.714", "64.286"):
        assert figure in text
