"""proxy/config.py: parsing, defaults, errors that name the field and the line; the CLI around it."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, interpolate_env, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
JOULEGATE = REPO / ".venv" / "bin" / "joulegate"

ACME_DIGEST = hashlib.sha256(b"sk-acme").hexdigest()
ADMIN_DIGEST = hashlib.sha256(b"sk-admin").hexdigest()

# The contract's example, with its placeholders filled in and a `${VAR:-default}` added.
CONTRACT_EXAMPLE = f"""\
server: {{host: "${{JG_HOST:-127.0.0.1}}", port: 8080, max_body_bytes: 10485760, request_timeout_s: 600}}
backends:
  - name: h100-a                        # unique; shows up in headers, metrics, ledger
    url: http://10.0.0.5:8000/v1        # an OpenAI-compatible base URL
    api_key: ${{UPSTREAM_KEY}}            # optional; sent upstream instead of the client's key
    models: [llama-3.1-8b]              # optional; otherwise read from GET {{url}}/models
    max_concurrency: 256                # optional hard cap
    metrics_url: http://10.0.0.5:8000/metrics   # optional engine Prometheus endpoint
    power:
      source: dcgm
      gpus: [0, 1]                      # NVML indices or UUIDs
      url: http://10.0.0.5:9400/metrics # dcgm: the exporter's metrics URL
      interval_s: 0.1
  - name: l4-b
    url: http://10.0.0.6:8000/v1/
    power: {{source: agent, url: "http://10.0.0.6:9464", gpus: [GPU-1234]}}
routing:
  policy: efficiency                    # round_robin | least_loaded | efficiency
  slo: {{ttft_ms: 2000, tpot_ms: 200}}
energy:
  idle: separate
  prefill_weight: 0.1
tenants:
  - name: acme
    api_keys_sha256: ["{ACME_DIGEST.upper()}"]
    energy_budget: {{joules: 5.0e6, per: day}}   # optional; over it -> 429 insufficient_quota
admin_api_keys_sha256: ["{ADMIN_DIGEST}"]
anonymous_tenant: null
ledger: ${{JG_LEDGER:-sqlite:///var/lib/joulegate/ledger.db}}
"""

MINIMAL = "backends:\n  - name: a\n    url: http://127.0.0.1:8000/v1\n"


def _error(text: str, env: dict[str, str] | None = None, source: str = "cfg.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source, env={} if env is None else env)
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    return message


# -- valid configs --------------------------------------------------------------------------------


def test_contract_example_parses_with_env_interpolation() -> None:
    config = parse_config(CONTRACT_EXAMPLE, env={"UPSTREAM_KEY": "sk-upstream-xyz"})
    assert isinstance(config, Config)
    assert config.server.host == "127.0.0.1"  # ${JG_HOST:-127.0.0.1} with JG_HOST unset
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 10485760
    assert config.server.request_timeout_s == 600
    a, b = config.backends
    assert a.name == "h100-a"
    assert a.url == "http://10.0.0.5:8000/v1"
    assert a.api_key == "sk-upstream-xyz"
    assert a.models == ["llama-3.1-8b"]
    assert a.max_concurrency == 256
    assert a.metrics_url == "http://10.0.0.5:8000/metrics"
    assert a.power.source == "dcgm"
    assert a.power.gpus == [0, 1]
    assert a.power.url == "http://10.0.0.5:9400/metrics"
    assert a.power.interval_s == pytest.approx(0.1)
    assert b.url == "http://10.0.0.6:8000/v1"  # trailing slash dropped
    assert b.api_key is None and b.models is None and b.max_concurrency is None
    assert b.power.source == "agent" and b.power.gpus == ["GPU-1234"]
    assert config.routing.policy == "efficiency"
    assert config.routing.slo.ttft_ms == 2000 and config.routing.slo.tpot_ms == 200
    assert config.energy.idle == "separate" and config.energy.prefill_weight == pytest.approx(0.1)
    (tenant,) = config.tenants
    assert tenant.name == "acme"
    assert tenant.api_keys_sha256 == [ACME_DIGEST]  # upper-case hex normalised to lower case
    assert tenant.energy_budget is not None
    assert tenant.energy_budget.joules == 5.0e6 and tenant.energy_budget.per == "day"
    assert config.admin_api_keys_sha256 == [ADMIN_DIGEST]
    assert config.anonymous_tenant is None
    assert config.ledger == "sqlite:///var/lib/joulegate/ledger.db"  # the :- default


def test_env_value_wins_over_default() -> None:
    config = parse_config(
        CONTRACT_EXAMPLE,
        env={"UPSTREAM_KEY": "k", "JG_HOST": "0.0.0.0", "JG_LEDGER": "redis://cache:6379/2"},
    )
    assert config.server.host == "0.0.0.0"
    assert config.ledger == "redis://cache:6379/2"


def test_env_interpolation_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JG_TEST_BACKEND_URL", "http://gpu-7:8000/v1")
    config = parse_config("backends:\n  - name: a\n    url: ${JG_TEST_BACKEND_URL}\n")
    assert config.backends[0].url == "http://gpu-7:8000/v1"


def test_interpolate_env_forms() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate_env("x${A}y", env) == "x1y"
    assert interpolate_env("${B:-fallback}", env) == "fallback"
    assert interpolate_env("${B:-}", env) == ""
    assert interpolate_env("${EMPTY:-fallback}", env) == ""  # set (even empty) beats the default
    assert interpolate_env("$A and $${A}", env) == "$A and $1"  # only the braced form


def test_defaults_for_a_minimal_config() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    assert config.server.request_timeout_s == 600
    assert config.routing.policy == "efficiency"
    assert config.routing.slo.ttft_ms == 2000 and config.routing.slo.tpot_ms == 200
    assert config.energy.idle == "separate" and config.energy.prefill_weight == pytest.approx(0.05)
    assert config.tenants == [] and config.admin_api_keys_sha256 == []
    assert config.anonymous_tenant is None
    assert config.backends[0].power.source == "none"
    assert config.ledger is None  # parse_config knows no file to put it beside


def test_load_config_defaults_ledger_to_sqlite_beside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "joulegate.yaml"
    path.parent.mkdir()
    path.write_text(MINIMAL, encoding="utf-8")
    config = load_config(path)
    assert config.ledger is not None
    assert config.ledger.startswith("sqlite:///")
    db = Path(config.ledger.removeprefix("sqlite:///"))
    if not db.is_absolute():  # sqlite:////abs/path form
        db = Path("/" + str(db))
    assert db.parent == path.parent.resolve()
    assert db.suffix == ".db"


def test_load_config_keeps_an_explicit_ledger(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + "ledger: memory://\n", encoding="utf-8")
    assert load_config(path).ledger == "memory://"


def test_load_config_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"backends: []  # caf\xe9\n")
    with pytest.raises(ConfigError, match="latin1.yaml"):
        load_config(path)


# -- errors name the field and the line -------------------------------------------------------------


def test_bad_port_on_line_3() -> None:
    text = "server:\n  host: 0.0.0.0\n  port: notaport\nbackends:\n  - {name: a, url: http://x}\n"
    message = _error(text)
    assert message.startswith("cfg.yaml: line 3: ")
    assert "server.port" in message


def test_port_out_of_range() -> None:
    message = _error("server:\n  port: 70000\n" + MINIMAL)
    assert "line 2" in message and "server.port" in message


def test_backend_url_without_scheme_in_second_backend() -> None:
    text = (
        "backends:\n"
        "  - name: a\n"
        "    url: http://10.0.0.4:8000/v1\n"
        "  - name: b\n"
        "    models: [m]\n"
        "    url: 10.0.0.5:8000/v1\n"
    )
    message = _error(text)
    assert "line 6: " in message
    assert "backends.1.url" in message
    assert "http://" in message


def test_unknown_key_is_named_with_its_line() -> None:
    text = "server:\n  host: 0.0.0.0\n  prot: 8080\n" + MINIMAL
    message = _error(text)
    assert "line 3: " in message
    assert "server.prot" in message


def test_unknown_top_level_key() -> None:
    message = _error(MINIMAL + "routnig:\n  policy: round_robin\n")
    assert "line 4: " in message and "routnig" in message


def test_unknown_policy_is_named() -> None:
    message = _error(MINIMAL + "routing:\n  policy: fastest\n")
    assert "line 5: " in message and "routing.policy" in message


def test_duplicate_backend_names_name_the_field_and_line() -> None:
    text = (
        "backends:\n"
        "  - name: gpu\n"
        "    url: http://a:8000/v1\n"
        "  - name: gpu\n"
        "    url: http://b:8000/v1\n"
    )
    message = _error(text)
    assert "duplicate" in message and "'gpu'" in message
    assert "backends" in message
    # The second `name: gpu` (line 4) is the culprit; the item starts on the same line.
    assert "line 4" in message


def test_bad_sha256_digest() -> None:
    text = MINIMAL + f'tenants:\n  - name: acme\n    api_keys_sha256: ["{ACME_DIGEST}", "not-a-digest"]\n'
    message = _error(text)
    assert "line 6: " in message
    assert "tenants.0.api_keys_sha256" in message
    assert "SHA-256" in message


def test_bad_admin_digest_length() -> None:
    message = _error(MINIMAL + f'admin_api_keys_sha256: ["{ADMIN_DIGEST[:-1]}"]\n')
    assert "admin_api_keys_sha256" in message and "line 4" in message


def test_power_source_dcgm_without_url() -> None:
    text = MINIMAL + "    power:\n      source: dcgm\n      gpus: [0]\n"
    message = _error(text)
    assert "backends.0.power" in message
    assert "url" in message and "dcgm" in message
    assert "line 4: " in message or "line 5: " in message  # the power block or its source


@pytest.mark.parametrize("source", ["agent", "sim"])
def test_power_sources_that_need_a_url(source: str) -> None:
    message = _error(MINIMAL + f"    power: {{source: {source}}}\n")
    assert "line 4: " in message and source in message


def test_power_source_nvml_needs_no_url() -> None:
    config = parse_config(MINIMAL + "    power: {source: nvml, gpus: [0, GPU-abc]}\n", env={})
    assert config.backends[0].power.gpus == [0, "GPU-abc"]


def test_bad_ledger_url() -> None:
    message = _error(MINIMAL + "ledger: mysql://db/joulegate\n")
    assert "line 4: " in message and "ledger" in message


def test_no_backends() -> None:
    assert "backends" in _error("server: {port: 8080}\n")
    assert "backends" in _error("backends: []\n")


def test_invalid_yaml_names_the_line() -> None:
    text = "server:\n  host: a\n  port: 8080: 9\n" + MINIMAL
    message = _error(text)
    assert message.startswith("cfg.yaml: line 3: ")
    assert "YAML" in message


def test_config_that_is_not_a_mapping() -> None:
    assert "mapping" in _error("- just\n- a list\n")


def test_unset_env_var_names_variable_file_and_line() -> None:
    text = MINIMAL + "    api_key: ${UPSTREAM_KEY}\n"
    message = _error(text, env={}, source="cfg.yaml")
    assert "UPSTREAM_KEY" in message
    assert "line 4" in message
    # Every other config error starts with the file it is about; this one should too.
    assert message.startswith("cfg.yaml: ")


def test_unset_env_var_in_a_comment_is_not_an_error() -> None:
    text = "# api_key: ${UPSTREAM_KEY}   (commented out)\n" + MINIMAL
    config = parse_config(text, env={})
    assert config.backends[0].api_key is None


@pytest.mark.parametrize("value", ["sk-abc #1", "123456", "true", "*secret"])
def test_env_values_are_taken_verbatim(value: str) -> None:
    """A secret in ${UPSTREAM_KEY} must arrive as that string: not cut at ` #`, not a number."""
    config = parse_config(MINIMAL + "    api_key: ${UPSTREAM_KEY}\n", env={"UPSTREAM_KEY": value})
    assert config.backends[0].api_key == value


# -- the CLI ----------------------------------------------------------------------------------------

CONTRACT_COMMANDS = [
    "serve", "demo", "sim-backend", "agent", "simulate", "trace", "usage", "check-config",
]


def _cli_cases(tmp: Path) -> dict[str, list[str]]:
    good = tmp / "good.yaml"
    good.write_text(MINIMAL, encoding="utf-8")
    bad_port = tmp / "bad_port.yaml"
    bad_port.write_text("server:\n  host: 0.0.0.0\n  port: notaport\n" + MINIMAL, encoding="utf-8")
    unset_env = tmp / "unset_env.yaml"
    unset_env.write_text(MINIMAL + "    api_key: ${JG_TEST_SURELY_UNSET_VAR}\n", encoding="utf-8")
    joulegate = str(JOULEGATE)
    cases = {
        "check_good": [joulegate, "check-config", str(good)],
        "check_bad_port": [joulegate, "check-config", str(bad_port)],
        "check_unset_env": [joulegate, "check-config", str(unset_env)],
        "serve_bad_port_flag": [joulegate, "serve", "-c", str(good), "--port", "notaport"],
        "help": [joulegate, "--help"],
        "module_help": [sys.executable, "-m", "proxy", "--help"],
    }
    for command in CONTRACT_COMMANDS:
        if command in _subcommands():
            cases[f"help_{command}"] = [joulegate, command, "--help"]
    return cases


def _subcommands() -> set[str]:
    from proxy.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """The CLI cases that need a real process, run once and concurrently."""
    assert JOULEGATE.exists(), f"{JOULEGATE} missing: install the project into .venv"
    cases = _cli_cases(tmp_path_factory.mktemp("cli"))
    env = {k: v for k, v in os.environ.items() if k not in ("JOULEGATE_CONFIG", "JG_TEST_SURELY_UNSET_VAR")}

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return dict(zip(cases, pool.map(run, cases.values()), strict=True))


def _one_line(returncode: int, stderr: str) -> str:
    assert returncode == 2, (returncode, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].strip()
    return lines[0]


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    return _one_line(result.returncode, result.stderr)


def _main_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`joulegate ARGV` in this process: (exit status, stdout, stderr)."""
    from proxy.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_ok(cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = cli["check_good"]
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert result.stderr == ""


def test_check_config_bad_field(cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _one_line_error(cli["check_bad_port"])
    assert "bad_port.yaml" in line and "line 3" in line and "server.port" in line
    assert cli["check_bad_port"].stdout == ""


def test_check_config_unset_env_names_the_variable(cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert "JG_TEST_SURELY_UNSET_VAR" in _one_line_error(cli["check_unset_env"])


def test_bad_port_flag_exits_2_with_one_line(cli: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _one_line_error(cli["serve_bad_port_flag"])
    assert "notaport" in line and "--port" in line
    assert cli["serve_bad_port_flag"].stdout == ""


@pytest.mark.parametrize("case", ["help", "module_help"])
def test_top_level_help(cli: dict[str, subprocess.CompletedProcess[str]], case: str) -> None:
    result = cli[case]
    assert result.returncode == 0, result.stderr
    assert "check-config" in result.stdout and "serve" in result.stdout


@pytest.mark.parametrize("command", CONTRACT_COMMANDS)
def test_each_subcommand_has_help(cli: dict[str, subprocess.CompletedProcess[str]], command: str) -> None:
    if command not in _subcommands():
        pytest.skip(f"`joulegate {command}` is not implemented yet")
    result = cli[f"help_{command}"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and command in result.stdout


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("backends: [\n", "YAML"),
        (MINIMAL + "    api_key: ${JG_TEST_SURELY_UNSET_VAR}\n", "JG_TEST_SURELY_UNSET_VAR"),
        (MINIMAL + "routing: {policy: fastest}\n", "routing.policy"),
    ],
)
def test_check_config_failures_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    text: str, needle: str,
) -> None:
    monkeypatch.delenv("JG_TEST_SURELY_UNSET_VAR", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    code, out, err = _main_in_process(["check-config", str(path)], capsys)
    assert needle in _one_line(code, err)
    assert out == ""


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main_in_process(["check-config", str(tmp_path / "missing.yaml")], capsys)
    assert "missing.yaml" in _one_line(code, err)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "-c", "x.yaml", "--port", "99999"],
        ["serve", "-c", "x.yaml", "--workers", "0"],
        ["serve", "-c", "x.yaml", "--log-level", "chatty"],
        ["--frobnicate"],
        ["frobnicate"],
        [],
        ["check-config"],
        ["demo", "--requests", "many"],
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main_in_process(argv, capsys)
    _one_line(code, err)
    assert out == ""


def test_serve_with_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: -1\n" + MINIMAL, encoding="utf-8")
    code, _, err = _main_in_process(["serve", "-c", str(path)], capsys)
    line = _one_line(code, err)
    assert "line 2" in line and "server.port" in line


def test_serve_without_a_config_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOULEGATE_CONFIG", raising=False)
    code, _, err = _main_in_process(["serve"], capsys)
    assert "config" in _one_line(code, err).lower()


def test_tenant_named_admin_is_reserved() -> None:
    text = MINIMAL + "tenants:\n  - {name: admin}\n"
    with pytest.raises(ConfigError, match="reserved"):
        parse_config(text, env={})


@pytest.mark.parametrize("extra", [
    f'  - {{name: globex, api_keys_sha256: ["{ACME_DIGEST}"]}}\n',
    f'admin_api_keys_sha256: ["{ACME_DIGEST}"]\n',
])
def test_one_key_digest_cannot_belong_to_two_identities(extra: str) -> None:
    text = MINIMAL + f'tenants:\n  - {{name: acme, api_keys_sha256: ["{ACME_DIGEST}"]}}\n' + extra
    with pytest.raises(ConfigError, match="already given to"):
        parse_config(text, env={})


def test_ledger_options_ride_in_the_url_query_and_bad_ones_name_themselves() -> None:
    from proxy.ledger import open_ledger

    config = parse_config(MINIMAL + "ledger: 'sqlite:///tmp/jg.db?retention_days=90&flush_interval_s=0.5'\n", env={})
    ledger = open_ledger(config.ledger or "")
    assert ledger.retention_s == 90 * 86_400 and ledger.flush_interval_s == 0.5
    assert ledger.path == "/tmp/jg.db"  # type: ignore[attr-defined]
    for bad, says in (("sqlite:///x.db?key_prefix=jg", "does not apply"), ("memory://?retention_days=0", "positive"),
                      ("redis://:s3cret@h:6379/0?nope=1", "unknown ledger option 'nope'"),
                      ("postgresql://u:s3cret@h/db?key_prefix=jg", "does not apply to a postgres"),
                      ("redis://h:6379/0?pool_size=2", "does not apply")):
        with pytest.raises(ConfigError, match=says) as info:
            parse_config(MINIMAL + f"ledger: '{bad}'\n", env={})
        assert "s3cret" not in str(info.value)
    # PostgreSQL: its own options reach the store, the password stays in the URL it connects with.
    url = "postgresql://u:s3cret@db:5432/jg?pool_size=8&connect_timeout_s=2&sslmode=require&retention_days=7"
    ledger = open_ledger(parse_config(MINIMAL + f"ledger: '{url}'\n", env={}).ledger or "")
    assert ledger.retention_s == 7 * 86_400 and ledger._pool_size == 8  # type: ignore[attr-defined]
    assert ledger.url == "postgresql://u:s3cret@db:5432/jg"  # type: ignore[attr-defined]
    assert ledger._conn_kwargs["sslmode"] == "require"  # type: ignore[attr-defined]


def test_demo_prints_tables_and_the_governors_advice(capsys: pytest.CaptureFixture[str]) -> None:
    """`joulegate demo` end to end (simulators, proxy, SDK workload): both tables, and an
    advised cap for every backend while nothing is changed (advise mode)."""
    from proxy.demo import FLEET, run_demo
    from tests.conftest import free_port

    port = free_port()
    assert run_demo(port=port, requests=12) == 0
    out = capsys.readouterr().out
    assert "12 requests in" in out
    assert "governor (advise mode" in out
    advice = out.split("governor (advise mode", 1)[1].splitlines()[2:]
    for name, _profile in FLEET:
        row = next(line for line in advice if line.startswith(name))
        assert row.split()[1].isdigit(), row  # a cap in W, not "-"
