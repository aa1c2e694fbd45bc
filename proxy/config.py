"""Typed configuration: YAML with ${ENV} interpolation, validated by pydantic.

Errors name the field and the line it came from, so `joulegate check-config` can point at it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.ledger import ledger_options
from proxy.passthrough import check_path, resolve

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PassthroughEdit(_Strict):
    """`server.passthrough: {add: [...], remove: [...]}`: the default allowlist, edited."""

    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    # Requests open at once across all backends; past it new ones get 429 `rate_limit_exceeded`
    # at once, before their body is read. None: no limit.
    max_in_flight: int | None = Field(2048, gt=0)
    # Circuit breaker per backend: open after this many consecutive failures (connect errors,
    # garbage, 5xx; not time-outs); after the cooldown one probe request goes through (half-open)
    # and its outcome closes the circuit or re-opens it.
    circuit_failures: int = Field(5, gt=0)
    circuit_cooldown_s: float = Field(10.0, gt=0)
    health_interval_s: float = Field(5.0, gt=0)
    # A streaming client that takes no byte for this long is cut off (its GPU slot freed).
    client_write_timeout_s: float = Field(30.0, gt=0)
    # A request body that has not fully arrived this long after the headers gets 408: a slow
    # sender must not hold one of the `max_in_flight` slots.
    client_read_timeout_s: float = Field(30.0, gt=0)
    # Longer than clients' and load balancers' idle expiry (httpx 5 s, AWS ALB 60 s), so the
    # server never closes a connection a client is just reusing.
    keepalive_timeout_s: float = Field(75.0, gt=0)
    # A stream is cut (an SSE error event, status 504) when the backend sends no chunk for this
    # long, or when it has run `stream_max_s` in all (None: no overall cap). request_timeout_s
    # bounds only the wait for a stream's response head. Checked once a second.
    stream_idle_timeout_s: float = Field(60.0, gt=0)
    stream_max_s: float | None = Field(None, gt=0)
    # A streamed answer whose unfinished SSE event grows past this many bytes (one endless
    # line) is cut with an error event; what was relayed is billed.
    max_sse_line_bytes: int = Field(1024 * 1024, gt=0)
    # Prometheus /metrics on its own listener (same host); the main port then answers 404 there.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # POST routes relayed to backends (proxy/passthrough.py): a list replaces the default,
    # {add: [...], remove: [...]} edits it; any other path is a 404 that never leaves the proxy.
    passthrough: list[str] | PassthroughEdit | None = None

    @field_validator("passthrough")
    @classmethod
    def _passthrough_paths(cls, value: list[str] | PassthroughEdit | None) -> list[str] | PassthroughEdit | None:
        for path in value.add + value.remove if isinstance(value, PassthroughEdit) else value or []:
            check_path(path)
        return value

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> ServerConfig:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("server.metrics_port must differ from server.port")
        return self

    def passthrough_paths(self) -> frozenset[str]:
        """The POST paths relayed besides the proxy's own inference routes."""
        if isinstance(self.passthrough, PassthroughEdit):
            return resolve(None, self.passthrough.add, self.passthrough.remove)
        return resolve(self.passthrough, [], [])


class PowerConfig(_Strict):
    source: Literal["nvml", "dcgm", "agent", "sim", "none"] = "none"
    gpus: list[int | str] = Field(default_factory=list)
    url: str | None = None
    interval_s: float = Field(0.1, gt=0)
    # Silence this long (s) marks the source down: energy is then modelled (method `estimated`).
    # None: 10 sample intervals, at least 2 s.
    stale_after_s: float | None = Field(None, gt=0)
    # source agent: its bearer token, from a file or an environment variable (one of them), and
    # a CA bundle to verify an https:// agent's certificate (default: the system's).
    token_file: str | None = None
    token_env: str | None = None
    ca_file: str | None = None
    # Host (CPU + DRAM) draw in W, billed like GPU energy where the agent reads no RAPL counters.
    host_w: float | None = Field(None, ge=0)

    @property
    def stale_s(self) -> float:
        """Seconds without a reading after which the source counts as down."""
        return self.stale_after_s if self.stale_after_s is not None else max(10 * self.interval_s, 2.0)

    @model_validator(mode="after")
    def _url_where_needed(self) -> PowerConfig:
        if self.source in ("dcgm", "agent", "sim") and not self.url:
            raise ValueError(f"power.url is required for source '{self.source}'")
        if self.token_file and self.token_env:
            raise ValueError("power.token_file and power.token_env are exclusive: give one")
        return self


class BackendConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str
    api_key: str | None = None
    models: list[str] | None = None
    max_concurrency: int | None = Field(None, gt=0)
    metrics_url: str | None = None
    power: PowerConfig = Field(default_factory=PowerConfig)
    site: str | None = None  # a name from `sites:`: its PUE and grid carbon intensity

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class SloConfig(_Strict):
    ttft_ms: float = Field(2000.0, gt=0)
    tpot_ms: float = Field(200.0, gt=0)


class RoutingConfig(_Strict):
    policy: Literal["round_robin", "least_loaded", "efficiency"] = "efficiency"
    slo: SloConfig = Field(default_factory=SloConfig)
    # efficiency minimises GPU joules, or grams CO2e (joules x PUE x the site's grid now).
    objective: Literal["joules", "carbon"] = "joules"


class EnergyConfig(_Strict):
    idle: Literal["separate", "share"] = "separate"
    # One prompt token's energy relative to one generated token. bench/attribution measured the
    # simulated GPUs at 0.02-0.03 at small batches; 0.05 met every accuracy target there, where
    # the contract example's 0.1 over-billed long prompts (per-tenant error 4.4% vs 1.2%).
    prefill_weight: float = Field(0.05, ge=0)


class SiteCarbonConfig(_Strict):
    """Grid intensity source (proxy/carbon.py): exactly one of a constant, a CSV of
    `timestamp,gco2e_per_kwh` rows, or a JSON endpoint polled every `interval_s`."""

    gco2e_per_kwh: float | None = Field(None, ge=0)
    csv: str | None = None
    url: str | None = None
    field: str = "carbonIntensity"  # dotted path to the number in the endpoint's JSON
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. {auth-token: "${EM_TOKEN}"}; never logged
    interval_s: float = Field(300.0, ge=10)

    @model_validator(mode="after")
    def _exactly_one(self) -> SiteCarbonConfig:
        given = [k for k in ("gco2e_per_kwh", "csv", "url") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of gco2e_per_kwh, csv, url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class SiteConfig(_Strict):
    name: str = Field(min_length=1)
    pue: float = Field(1.0, ge=1.0, le=5.0)  # facility energy / IT energy
    carbon: SiteCarbonConfig


class EnergyBudget(_Strict):
    joules: float = Field(gt=0)
    per: Literal["hour", "day", "month"] = "day"


class TenantConfig(_Strict):
    name: str = Field(min_length=1)
    api_keys_sha256: list[str] = Field(default_factory=list)
    energy_budget: EnergyBudget | None = None
    energy_budget_failure: Literal["open", "closed"] | None = None  # None: the top-level setting

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == "admin":
            raise ValueError("'admin' is reserved: requests made with admin keys are billed to it")
        return name

    @field_validator("api_keys_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if not _HEX64_RE.match(digest.lower()):
                raise ValueError("each entry must be a hex SHA-256 digest (64 hex characters)")
        return [d.lower() for d in digests]


class MetricsConfig(_Strict):
    tenant_label: bool = False


class ClusterConfig(_Strict):
    """Replicas sharing backends exchange their weights (proxy/energy/shares.py)."""

    enabled: bool = True
    # Default: the ledger's URL when it is redis:// or rediss://; without any Redis, engine
    # metrics (backends' metrics_url) stand in; without those either, no exchange at all.
    redis_url: str | None = None
    key_prefix: str = Field("joulegate:", min_length=1)  # streams <prefix>w:<backend>
    heartbeat_s: float = Field(0.1, gt=0, le=5)  # publish + read, one round trip per beat
    peer_timeout_s: float = Field(1.0, gt=0)  # a replica silent this long counts as gone
    # Longest a sample interval waits for the other replicas' weights before it is split
    # with their last known ones (they wait for their non-streamed requests to finish).
    max_wait_s: float = Field(30.0, ge=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://")):
            raise ValueError("must be redis://HOST:PORT/DB or rediss://...")
        return url


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    backends: list[BackendConfig] = Field(min_length=1)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)
    admin_api_keys_sha256: list[str] = Field(default_factory=list)
    anonymous_tenant: str | None = None
    ledger: str | None = None
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    # A budget whose ledger store does not answer within 50 ms: let the request through (open)
    # or refuse it with 503 (closed). Per tenant too.
    energy_budget_failure: Literal["open", "closed"] = "open"
    sites: list[SiteConfig] = Field(default_factory=list)  # data centres: PUE, grid intensity

    @model_validator(mode="after")
    def _sites_known(self) -> Config:
        names = {s.name for s in self.sites}
        if len(names) != len(self.sites):
            raise ValueError("duplicate site name")
        for b in self.backends:
            if b.site is not None and b.site not in names:
                raise ValueError(f"backend '{b.name}': site '{b.site}' is not in sites:")
        if self.routing.objective == "carbon" and not any(b.site for b in self.backends):
            raise ValueError("routing.objective carbon needs sites: and a site: per backend")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for kind, names in (
            ("backend", [b.name for b in self.backends]),
            ("tenant", [t.name for t in self.tenants]),
        ):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"duplicate {kind} name '{name}'")
                seen.add(name)
        # One key, one identity: a digest under two tenants (or a tenant and admin) would
        # silently bill or authorise as whichever was read last.
        owner: dict[str, str] = {d: "admin" for d in self.admin_api_keys_sha256}
        for tenant in self.tenants:
            for digest in tenant.api_keys_sha256:
                if owner.get(digest, tenant.name) != tenant.name:
                    raise ValueError(f"tenant '{tenant.name}' has an API key digest already given to "
                                     f"'{owner[digest]}'")
                owner[digest] = tenant.name
        return self

    @field_validator("admin_api_keys_sha256")
    @classmethod
    def _admin_digests(cls, digests: list[str]) -> list[str]:
        return TenantConfig._hex_digests(digests)

    @field_validator("ledger")
    @classmethod
    def _ledger_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite://", "redis://", "rediss://", "memory://")):
            raise ValueError("must be sqlite:///PATH, redis://HOST:PORT/DB or memory://")
        if url is not None:
            ledger_options(url)  # options in its query: a bad one is a config error
        return url


class ConfigError(Exception):
    """A config that cannot be used; `str()` is one line naming the field and its line."""


def interpolate_env(text: str, env: dict[str, str] | None = None) -> str:
    """Replace ${VAR} and ${VAR:-default}; an unset variable without default is an error."""
    env = os.environ if env is None else env

    def _sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        line = text.count("\n", 0, match.start()) + 1
        raise ConfigError(f"line {line}: environment variable ${{{name}}} is not set")

    return _ENV_RE.sub(_sub, text)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and sequence item."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
    loader.lines[id(mapping)] = lines  # type: ignore[attr-defined]
    return mapping


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> list[Any]:
    seq = loader.construct_sequence(node, deep=True)
    loader.lines[id(seq)] = {i: item.start_mark.line + 1 for i, item in enumerate(node.value)}  # type: ignore[attr-defined]
    return seq


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _line_of(data: Any, loc: tuple[Any, ...], lines: dict[int, dict[Any, int]]) -> int | None:
    """Deepest known line along a pydantic error location."""
    line = None
    node = data
    for part in loc:
        known = lines.get(id(node), {})
        if part in known:
            line = known[part]
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    return line


_PLACEHOLDER_RE = re.compile(r"__jgenv(\d+)__")


def _construct_str(loader: _LineLoader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_scalar(node)
    if "__jgenv" not in value:
        return value
    env, refs = loader.env, loader.refs  # type: ignore[attr-defined]

    def _sub(m: re.Match[str]) -> str:
        name, default = refs[int(m.group(1))]
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{loader.source}: line {node.start_mark.line + 1}: environment variable ${{{name}}} is not set")  # type: ignore[attr-defined]

    return _PLACEHOLDER_RE.sub(_sub, value)


_LineLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def parse_config(text: str, source: str = "<config>", env: dict[str, str] | None = None) -> Config:
    """Parse YAML text into a Config or raise ConfigError naming field and line."""
    refs: list[tuple[str, str | None]] = []

    def _mark(m: re.Match[str]) -> str:
        refs.append((m.group(1), m.group(2)))
        return f"__jgenv{len(refs) - 1}__"

    text = _ENV_RE.sub(_mark, text)
    loader = _LineLoader(text)
    loader.lines = {}  # type: ignore[attr-defined]
    loader.env, loader.refs, loader.source = (os.environ if env is None else env), refs, source  # type: ignore[attr-defined]
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: line 1: the config must be a mapping")
    for kind in ("backends", "tenants"):
        items = data.get(kind)
        if not isinstance(items, list):
            continue
        first: dict[str, int] = {}
        for i, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                continue
            if name in first:
                line = _line_of(data, (kind, i, "name"), loader.lines)  # type: ignore[attr-defined]
                raise ConfigError(f"{source}: line {line}: {kind}.{i}.name: duplicate {kind[:-1]} name "
                                  f"'{name}' (also {kind}.{first[name]}.name)")
            first[name] = i
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(data, loc, loader.lines)  # type: ignore[attr-defined]
        where = f"line {line}: " if line else ""
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}{field}: {err['msg']}{more}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; the default ledger is a SQLite file beside it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    config = parse_config(text, str(path))
    for site in config.sites:  # a relative CSV is read beside the config file, and checked now
        if site.carbon.csv is not None:
            from proxy.carbon import read_intensity_csv
            site.carbon.csv = str(path.resolve().parent / site.carbon.csv)
            try:
                read_intensity_csv(site.carbon.csv)
            except ValueError as exc:
                raise ConfigError(f"{path}: sites: {site.name}: {exc}") from None
    if config.ledger is None:
        config.ledger = f"sqlite:///{path.resolve().parent / 'joulegate-ledger.db'}"
    return config
