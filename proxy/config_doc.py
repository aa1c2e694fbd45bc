"""docs/config.md, generated from the config's JSON Schema: `python -m proxy.config_doc > docs/config.md`.

One table per section (top-level key), one row per key: its path, type, default and description.
The schema is `Config.model_json_schema()`, so a field added to proxy/config.py with a
`description=` shows up here after regeneration; tests/test_docs.py fails while the page is stale.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.config import Config

REGENERATE = "python -m proxy.config_doc > docs/config.md"  # or `make docs`

EXAMPLE = """\
server: {host: 127.0.0.1, port: 8080, max_body_bytes: 10485760, request_timeout_s: 600}
backends:
  - name: h100-a                        # unique; shows up in headers, metrics, ledger
    url: http://10.0.0.5:8000/v1        # an OpenAI-compatible base URL (vLLM, SGLang, TGI, llama.cpp, Ollama)
    api_key: ${UPSTREAM_KEY}            # optional; sent upstream instead of the client's key
    models: [llama-3.1-8b]              # optional; otherwise read from GET {url}/models
    max_concurrency: 256                # optional hard cap
    metrics_url: http://10.0.0.5:8000/metrics   # optional engine Prometheus endpoint (load signals)
    power:
      source: agent                     # nvml | dcgm | agent | sim | none
      gpus: [0, 1]                      # NVML indices or UUIDs; for dcgm/agent: which GPUs of that host
      url: http://10.0.0.5:9464         # dcgm: the exporter's /metrics URL; agent, sim: base of /v1/power
      token_env: JOULEGATE_AGENT_TOKEN  # agent on a non-loopback address: its bearer token
      interval_s: 0.1
routing:
  policy: efficiency                    # round_robin | least_loaded | efficiency
  slo: {ttft_ms: 2000, tpot_ms: 200}
energy:
  idle: separate                        # separate | share
  prefill_weight: 0.05                  # one prompt token's energy relative to one generated token
tenants:
  - name: acme
    api_keys_sha256: ["f2d4b279b82ad92867af5878fe7482caebdd7b75499868d0362a6e63ff51f046"]  # sha256 of the key
    # (`joulegate keys new --tenant acme` makes a key and prints this line)
    energy_budget: {joules: 5.0e6, per: day}       # optional, or {gco2e: 1500, per: day}; over it -> 429
admin_api_keys_sha256: []
anonymous_tenant: null                  # a name bills keyless requests to it; null -> 401 without a key
ledger: sqlite:///var/lib/joulegate/ledger.db   # or redis://host:6379/0, postgresql://u:pw@host/db, memory://
energy_budget_failure: open             # open | closed
sites:                                  # optional: PUE and grid carbon per data centre
  - {name: north, pue: 1.2, carbon: {gco2e_per_kwh: 350}}   # backends add `site: north`
"""

_MINIMAL = {"backends": [{"name": "b", "url": "http://b"}], "tenants": [{"name": "t"}],
            "sites": [{"name": "s", "carbon": {"gco2e_per_kwh": 1}}]}


_BOUNDS = (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<="))


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if ref else node


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """A short type name: `int`, `float or null`, `list of string`, `"a" | "b"`, `object`."""
    if "anyOf" in node:
        return " or ".join(_type(part, defs) for part in node["anyOf"])
    if "$ref" in node:
        target = _resolve(node, defs)
        return " | ".join(json.dumps(v) for v in target["enum"]) if "enum" in target else "object"
    if "enum" in node:
        return " | ".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(node.get('items', {}), defs)}"
    bounds = [f"{op} {node[key]}" for key, op in _BOUNDS if key in node]
    name = {"integer": "int", "number": "float", "boolean": "bool", "string": "string"}.get(kind, kind)
    return f"{name} ({', '.join(bounds)})" if bounds else name


def _is_object(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    """The model schema a field holds (directly, or as the only non-null option), else None."""
    options = node.get("anyOf", [node])
    models = [_resolve(o, defs) for o in options if "$ref" in o and "properties" in _resolve(o, defs)]
    return models[0] if len(models) == 1 else None


def _default(path: str, node: dict[str, Any], instance: Any, required: bool) -> str:
    if required:
        return "required"
    if "default" in node:
        value = node["default"]
    else:  # a default_factory: read it off a minimal validated config
        value = instance
        for part in path.replace("[]", ".0").split("."):
            if isinstance(value, list):
                value = value[int(part)] if int(part) < len(value) else None
            else:
                value = value.get(part) if isinstance(value, dict) else None
    if value is None and node.get("type") == "array":
        value = []  # a list field of an optional object: its factory's empty list
    if isinstance(value, dict):
        return "see below"
    return f"`{json.dumps(value)}`"


def _rows(schema: dict[str, Any], defs: dict[str, Any], prefix: str, instance: Any) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    required = set(schema.get("required", []))
    for name, node in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        desc = node.get("description", "").replace("|", "\\|").replace("\n", " ")
        rows.append((f"`{path}`", _type(node, defs).replace("|", "\\|"),
                     _default(path, node, instance, name in required), desc))
        nested = _is_object(node, defs)
        items = node.get("items", {})
        if nested is not None:
            rows += _rows(nested, defs, f"{path}.", instance)
        elif node.get("type") == "array" and "$ref" in items and "properties" in _resolve(items, defs):
            rows += _rows(_resolve(items, defs), defs, f"{path}[].", instance)
    return rows


def render() -> str:
    """The whole of docs/config.md."""
    schema = Config.model_json_schema()
    defs = schema.get("$defs", {})
    instance = Config.model_validate(_MINIMAL).model_dump(mode="json")
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the config's JSON Schema; do not edit by hand. -->",
        "",
        "JouleGate reads one YAML file (`joulegate serve -c CONFIG`, or `$JOULEGATE_CONFIG`).",
        "`${ENV_VAR}` and `${ENV_VAR:-default}` in values are replaced from the environment; an unset",
        "variable without a default is an error naming its line. Unknown keys are errors.",
        "`joulegate check-config CONFIG` validates a file; `joulegate config-schema` prints the JSON",
        "Schema this page is generated from. Only `backends` (each with `name` and `url`) is required.",
        "",
        "```yaml",
        EXAMPLE.rstrip("\n"),
        "```",
        "",
        "Ledger options ride in the ledger URL's query: `retention_days`, `flush_interval_s`,",
        "`max_buffer`, `journal_path`; for SQLite `busy_timeout_s`, `synchronous`; for Redis",
        "`key_prefix`, `socket_timeout_s`; for PostgreSQL `connect_timeout_s`, `pool_size`, `sslmode`",
        "(e.g. `sqlite:///var/lib/joulegate/ledger.db?retention_days=90`).",
    ]
    top_rows = []
    sections = []
    required = set(schema.get("required", []))
    for name, node in schema["properties"].items():
        nested = _is_object(node, defs)
        items = node.get("items", {})
        if nested is None and not (node.get("type") == "array" and "$ref" in items):
            desc = node.get("description", "").replace("|", "\\|")
            top_rows.append((f"`{name}`", _type(node, defs).replace("|", "\\|"),
                             _default(name, node, instance, name in required), desc))
            continue
        sections.append((name, node.get("description", ""), _rows({"properties": {name: node},
                                                                   "required": list(required & {name})},
                                                                  defs, "", instance)[1:]))
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    out += ["", "## Top-level keys", "", *header, *("| " + " | ".join(r) + " |" for r in top_rows)]
    for name, desc, rows in sections:
        out += ["", f"## `{name}`", "", desc, "", *header, *("| " + " | ".join(r) + " |" for r in rows)]
    return "\n".join(out) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
