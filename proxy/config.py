"""Typed configuration: YAML with ${ENV} interpolation, validated by pydantic.

Errors name the field and the line it came from, so `joulegate check-config` can point at it.

Longer than ~500 lines on purpose: it holds every section's model with the descriptions that
docs/config.md is generated from, and the rules the config checks (pass-through paths, ledger
URL options), because it imports nothing of the proxy's own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PassthroughEdit(_Strict):
    """`server.passthrough: {add: [...], remove: [...]}`: the default allowlist, edited."""

    add: list[str] = Field(default_factory=list, description=(
        "Paths added to the default pass-through allowlist (exact `/v1/...` POST paths)."))
    remove: list[str] = Field(default_factory=list, description=(
        "Paths removed from the default pass-through allowlist."))


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the proxy listens on (`--host` overrides it).")
    port: int = Field(8080, ge=0, le=65535, description=(
        "TCP port the proxy listens on (`--port` overrides it); 0 picks a free one."))
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0, description=(
        "Largest request body accepted, in bytes; a bigger one gets 413."))
    request_timeout_s: float = Field(600.0, gt=0, description=(
        "Seconds to wait for a backend's response head, and for a whole non-streamed answer; past it "
        "504."))
    connect_timeout_s: float = Field(5.0, gt=0, description=(
        "Seconds to open a connection to a backend; a failure counts against its circuit breaker."))
    drain_timeout_s: float = Field(30.0, ge=0, description=(
        "Seconds requests in flight get to finish after SIGTERM before the server stops; 0: wait without limit."))
    max_in_flight: int | None = Field(2048, gt=0, description=(
        "Requests open at once across all backends; past it 429 `rate_limit_exceeded` before the body"
        " is read. null: no limit."))
    # Circuit breaker per backend: the probe's outcome closes the circuit or re-opens it.
    circuit_failures: int = Field(5, gt=0, description=(
        "Consecutive failures (connect errors, garbage, 5xx; not time-outs) that open a backend's "
        "circuit breaker."))
    circuit_cooldown_s: float = Field(10.0, gt=0, description=(
        "Seconds an open circuit waits before one probe request goes through (half-open)."))
    health_interval_s: float = Field(5.0, gt=0, description=(
        "Seconds between health checks (GET {url}/models) of each backend."))
    client_write_timeout_s: float = Field(30.0, gt=0, description=(
        "Seconds a streaming client may take no byte before it is cut off (billed for what it got)."))
    # A slow sender must not hold one of the `max_in_flight` slots.
    client_read_timeout_s: float = Field(30.0, gt=0, description=(
        "Seconds after the headers within which the request body must have arrived; else 408."))
    # Longer than clients' and load balancers' idle expiry (httpx 5 s, AWS ALB 60 s), so the
    # server never closes a connection a client is just reusing.
    keepalive_timeout_s: float = Field(75.0, gt=0, description=(
        "Seconds an idle client connection is kept open for reuse."))
    # request_timeout_s bounds only the wait for a stream's response head. Checked once a second.
    stream_idle_timeout_s: float = Field(60.0, gt=0, description=(
        "Seconds a stream may go without a chunk from the backend before it is cut (SSE error event "
        "`upstream_timeout`, status 504)."))
    stream_max_s: float | None = Field(None, gt=0, description=(
        "Seconds a stream may run in all before it is cut; null: no overall cap."))
    # One endless line from a backend must not grow the proxy's buffer without bound.
    max_sse_line_bytes: int = Field(1024 * 1024, gt=0, description=(
        "Bytes an unfinished SSE event from a backend may grow to before the stream is cut with an "
        "error event (what was relayed is billed)."))
    metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "Serve GET /metrics on this port of its own (same host); the main port then answers 404 "
        "there. null: on the main port."))
    # DEFAULT_PASSTHROUGH below; any other path is a 404 that never leaves the proxy.
    passthrough: list[str] | PassthroughEdit | None = Field(None, description=(
        "POST paths relayed to backends besides the inference routes: a list replaces the default "
        "allowlist, {add, remove} edits it; null: the default."))
    # Opt-in: one JSON line per finished request (proxy/accounting.py), off the per-chunk path.
    access_log: bool = Field(False, description=(
        "Log one JSON line per finished request on logger `joulegate.access`: time, request id, "
        "tenant, model, backend, status, tokens, joules, TTFT and total ms; never key material."))

    @field_validator("passthrough")
    @classmethod
    def _passthrough_paths(cls, value: list[str] | PassthroughEdit | None) -> list[str] | PassthroughEdit | None:
        for path in value.add + value.remove if isinstance(value, PassthroughEdit) else value or []:
            check_passthrough_path(path)
        return value

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> ServerConfig:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("server.metrics_port must differ from server.port")
        return self

    def passthrough_paths(self) -> frozenset[str]:
        """The POST paths relayed besides the proxy's own inference routes."""
        if isinstance(self.passthrough, PassthroughEdit):
            return resolve_passthrough(None, self.passthrough.add, self.passthrough.remove)
        return resolve_passthrough(self.passthrough, [], [])


class PowerConfig(_Strict):
    source: Literal["nvml", "dcgm", "agent", "sim", "none"] = Field("none", description=(
        "Where the backend's GPU power comes from: nvml (local GPUs), dcgm (a dcgm-exporter scrape), "
        "agent (`joulegate agent`), sim (the simulator), none (energy modelled, method `estimated`)."))
    gpus: list[int | str] = Field(default_factory=list, description=(
        "GPUs of the backend: NVML indices or UUIDs; for dcgm/agent, which GPUs of that host. Empty: "
        "all."))
    url: str | None = Field(None, description=(
        "dcgm: the exporter's /metrics URL; agent and sim: the base URL under which /v1/power lives. "
        "Required for those sources."))
    interval_s: float = Field(0.1, gt=0, description="Seconds between power readings.")
    stale_after_s: float | None = Field(None, gt=0, description=(
        "Seconds of silence after which the source counts as down and energy is modelled (method "
        "`estimated`); null: 10 sample intervals, at least 2 s."))
    token_file: str | None = Field(None, description=(
        "source agent: file holding the agent's bearer token (exclusive with token_env)."))
    token_env: str | None = Field(None, description=(
        "source agent: name of the environment variable holding the agent's bearer token (exclusive "
        "with token_file)."))
    ca_file: str | None = Field(None, description=(
        "source agent: CA bundle (PEM) to verify an https:// agent's certificate; null: the system's "
        "CAs."))
    host_w: float | None = Field(None, ge=0, description=(
        "Constant host (CPU + DRAM) draw in watts, split like GPU energy, where the agent reads no "
        "RAPL counters; null: no host energy."))

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


class ParkConfig(_Strict):
    # How the governor parks an idle backend in apply mode (proxy/governor/park.py).
    via: Literal["none", "vllm", "command"] = Field("none", description=(
        "none: never parked; vllm: POST {url without /v1}/sleep and /wake_up (vLLM sleep mode, needs "
        "VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode); command: run sleep_command / wake_command."))
    sleep_command: list[str] | None = Field(None, description=(
        "argv run to park the backend (via: command); exit status 0 means parked."))
    wake_command: list[str] | None = Field(None, description=(
        "argv run to wake the backend (via: command); exit status 0 means it serves again."))
    wake_timeout_s: float = Field(30.0, gt=0, description=(
        "Seconds a wake-up (or a park) may take; past it the backend is marked unhealthy, and a "
        "request waiting for it gets 503 no_healthy_backend."))
    level: Literal[1, 2] = Field(1, description=(
        "vLLM sleep level (via: vllm): 1 offloads the weights to CPU memory, 2 discards them."))

    @model_validator(mode="after")
    def _commands(self) -> ParkConfig:
        if self.via == "command" and not (self.sleep_command and self.wake_command):
            raise ValueError("park via command needs sleep_command and wake_command (argv lists)")
        return self


class BackendConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$", description=(
        "Unique backend name; shows up in headers, metrics and the ledger."))
    url: str = Field(description=(
        "OpenAI-compatible base URL (http:// or https://), e.g. http://10.0.0.5:8000/v1."))
    api_key: str | None = Field(None, description=(
        "Key sent upstream instead of the client's; null: no Authorization header upstream."))
    models: list[str] | None = Field(None, description="Models served; null: read from GET {url}/models.")
    max_concurrency: int | None = Field(None, gt=0, description=(
        "Requests in flight on this backend at most; past it 429. null: no cap."))
    metrics_url: str | None = Field(None, description=(
        "The engine's Prometheus endpoint (load signals, and weights between replicas without Redis)."))
    power: PowerConfig = Field(default_factory=PowerConfig, description="The backend's power source.")
    site: str | None = Field(None, description=(
        "A name from `sites:`: the backend's data centre (its PUE and grid carbon intensity)."))
    park: ParkConfig = Field(default_factory=ParkConfig, description=(
        "How the governor (mode apply) parks this backend while the others can carry the load."))
    # Measured (bench/attribution_virtual --stream-upstream): per-request p90 error 19-23% ->
    # 12-15%, per-tenant max 2.9-5.3% -> 0.6-1.9% on a mixed workload at 100 ms sampling.
    stream_upstream: bool | None = Field(None, description=(
        "Ask the engine to stream non-streamed chat, completion and Responses API answers and gather them into the "
        "one JSON answer the client asked for, so each token's time is seen and the energy split "
        "places the request as exactly as a stream; null: on where the backend has a power source. "
        "Turned off for the backend by itself if its streams carry no usage."))

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class SloConfig(_Strict):
    ttft_ms: float = Field(2000.0, gt=0, description=(
        "Time-to-first-token target, in milliseconds, for the efficiency policy."))
    tpot_ms: float = Field(200.0, gt=0, description=(
        "Time-per-output-token target, in milliseconds, for the efficiency policy."))


class RoutingConfig(_Strict):
    policy: Literal["round_robin", "least_loaded", "efficiency"] = Field("efficiency", description=(
        "round_robin, least_loaded, or efficiency (lowest marginal joules per token that meets the "
        "SLO)."))
    slo: SloConfig = Field(default_factory=SloConfig, description=(
        "Latency targets the efficiency policy must predict to meet."))
    objective: Literal["joules", "carbon"] = Field("joules", description=(
        "What the efficiency policy minimises: GPU joules per token, or grams CO2e per token "
        "(joules x PUE x the site's grid intensity now)."))


class EnergyConfig(_Strict):
    idle: Literal["separate", "share"] = Field("separate", description=(
        "separate: energy while a backend has nothing in flight is idle, not billed; share: spread it"
        " over the requests around it."))
    # One prompt token's energy relative to one generated token. bench/attribution measured the
    # simulated GPUs at 0.02-0.03 at small batches; 0.05 met every accuracy target there, where
    # the contract example's 0.1 over-billed long prompts (per-tenant error 4.4% vs 1.2%).
    prefill_weight: float = Field(0.05, ge=0, description=(
        "One prompt token's energy relative to one generated token (dimensionless)."))
    # proxy/energy/learn.py: a decayed non-negative fit of busy energy per 1 s window.
    learn: bool = Field(True, description=(
        "Learn each backend's split weights online from its power samples (length-dependent prefill, "
        "context- and batch-dependent decode), starting from prefill_weight; false: prefill_weight alone."))
    # A restart would otherwise bill its first minutes at the prior while the fit relearns.
    state_file: str | None = Field(None, description=(
        "JSON file where the learned split weights are kept across restarts (written at shutdown, "
        "read at start, aged by the time in between; relative: beside the config); null: learned anew."))
    # proxy/energy/attribution/restate.py. Bounded below the accounting's 120 s wait for a final.
    cold_start_hold_s: float = Field(60.0, ge=0, le=100, description=(
        "While a backend's split weights are still the prior (a cold start with learn on), its requests' "
        "final energy is held up to this long (s after the first one ended) and settled again once the "
        "weights are learned; 0: book the first requests with the prior weights."))


class SiteCarbonConfig(_Strict):
    """Grid intensity source (proxy/carbon.py): exactly one of a constant, a CSV of
    `timestamp,gco2e_per_kwh` rows, or a JSON endpoint polled every `interval_s`."""

    gco2e_per_kwh: float | None = Field(None, ge=0, description=(
        "A constant grid intensity, in grams CO2e per kWh."))
    csv: str | None = Field(None, description=(
        "A CSV schedule of `timestamp,gco2e_per_kwh` rows (ISO 8601 or epoch seconds); a relative "
        "path is read beside the config."))
    url: str | None = Field(None, description=(
        "An HTTP(S) endpoint answering JSON, polled every interval_s; the last good value is kept "
        "and figures are `estimated` while it is stale."))
    field: str = Field("carbonIntensity", description=(
        "Dotted path to the intensity (gCO2e/kWh) in the endpoint's JSON."))
    headers: dict[str, str] = Field(default_factory=dict, description=(
        "Headers sent to the endpoint (e.g. an auth token from ${ENV}); never logged."))
    interval_s: float = Field(300.0, ge=10, description="Seconds between polls of the endpoint.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SiteCarbonConfig:
        given = [k for k in ("gco2e_per_kwh", "csv", "url") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of gco2e_per_kwh, csv, url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class SiteConfig(_Strict):
    name: str = Field(min_length=1, description="Site name, named by backends' `site:`.")
    pue: float = Field(1.0, ge=1.0, le=5.0, description=(
        "Power usage effectiveness: facility energy / IT energy (dimensionless)."))
    carbon: SiteCarbonConfig = Field(description="The site's grid carbon intensity source.")


class EnergyBudget(_Strict):
    """A tenant's budget per period, in joules or in grams CO2e: exactly one of the two."""

    joules: float | None = Field(None, gt=0, description=(
        "Joules (GPU, as `x-energy-joules`) a tenant may use per period; over it requests get 429 "
        "`insufficient_quota`. Exactly one of joules or gco2e."))
    gco2e: float | None = Field(None, gt=0, description=(
        "Grams CO2e (of all-in energy at each site's grid intensity, as `x-energy-gco2e`) a tenant "
        "may emit per period; over it requests get 429 `insufficient_quota`. Needs a `site:` on "
        "every backend. Exactly one of joules or gco2e."))
    per: Literal["hour", "day", "month"] = Field("day", description=(
        "Budget period: hour, day or month (UTC calendar periods)."))

    @model_validator(mode="after")
    def _exactly_one(self) -> EnergyBudget:
        if (self.joules is None) == (self.gco2e is None):
            raise ValueError("give exactly one of joules or gco2e")
        return self

    @property
    def unit(self) -> Literal["joules", "gco2e"]:
        """What the budget counts: joules, or grams CO2e."""
        return "joules" if self.joules is not None else "gco2e"

    @property
    def amount(self) -> float:
        """The budget per period, in its unit (J or gCO2e)."""
        amount = self.joules if self.joules is not None else self.gco2e
        assert amount is not None  # _exactly_one
        return amount


class RateLimit(_Strict):
    """Requests and tokens a tenant may send per minute, across every replica sharing the ledger
    store (fixed 60 s windows aligned to the minute)."""

    rpm: int | None = Field(None, ge=1, description=(
        "Requests per minute; past it 429 `rate_limit_exceeded` with `x-ratelimit-*` and "
        "`retry-after` headers. null: no request limit."))
    tpm: int | None = Field(None, ge=1, description=(
        "Tokens per minute: a request counts its estimated prompt tokens plus max_tokens (256 "
        "without one) when admitted, corrected to the tokens it was billed when it ends. null: no "
        "token limit."))


class TenantConfig(_Strict):
    name: str = Field(min_length=1, description=(
        "Tenant name, as booked in the ledger ('admin' is reserved; no control characters)."))
    api_keys_sha256: list[str] = Field(default_factory=list, description=(
        "Hex SHA-256 digests of the tenant's API keys (`joulegate keys new` prints one)."))
    energy_budget: EnergyBudget | None = Field(None, description="Optional energy budget; null: none.")
    energy_budget_failure: Literal["open", "closed"] | None = Field(None, description=(
        "open or closed when the budget's store does not answer; null: the top-level setting."))
    rate_limit: RateLimit | None = Field(None, description=(
        "Requests and tokens per minute for the whole tenant (every key, config and managed, "
        "together); null: none. Managed keys may carry their own on top."))

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == "admin":
            raise ValueError("'admin' is reserved: requests made with admin keys are billed to it")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            # As the admin API's: a name is a ledger key and a metric label, and the ledger's
            # budget subjects of managed keys start with a control character.
            raise ValueError("a tenant name has no control characters")
        return name

    @field_validator("api_keys_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if not _HEX64_RE.match(digest.lower()):
                raise ValueError("each entry must be a hex SHA-256 digest (64 hex characters)")
        return [d.lower() for d in digests]


class MetricsConfig(_Strict):
    tenant_label: bool = Field(False, description=(
        "Add a `tenant` label to the per-request Prometheus metrics (cardinality grows with tenants)."))


class ClusterConfig(_Strict):
    """Replicas sharing backends exchange their weights (proxy/energy/shares.py)."""

    enabled: bool = Field(True, description=(
        "Exchange in-flight weights with other replicas sharing backends."))
    redis_url: str | None = Field(None, description=(
        "Redis for the exchange; null: the ledger's URL if redis:// or rediss://, else engine metrics"
        " (metrics_url) stand in, else no exchange."))
    key_prefix: str = Field("joulegate:", min_length=1, description=(
        "Prefix of the Redis stream keys (`<prefix>w:<backend>`)."))
    heartbeat_s: float = Field(0.1, gt=0, le=5, description=(
        "Seconds between publishing and reading weights (one round trip per beat)."))
    peer_timeout_s: float = Field(1.0, gt=0, description=(
        "Seconds of silence after which a replica counts as gone."))
    # The other replicas wait for their non-streamed requests to finish before publishing.
    max_wait_s: float = Field(30.0, ge=0, description=(
        "Seconds a sample interval waits for other replicas' weights before it is split with their "
        "last known ones."))

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://")):
            raise ValueError("must be redis://HOST:PORT/DB or rediss://...")
        return url


class GovernorConfig(_Strict):
    # GPU power caps chosen from load, SLO headroom and J/token (proxy/governor/).
    mode: Literal["off", "advise", "apply"] = Field("advise", description=(
        "off: no governor; advise: decisions (power caps, parking) logged and exported, nothing "
        "changed; apply: caps set through the backends' power agents (power.source agent or sim) and "
        "restored when the proxy stops, and idle backends with `park:` parked and woken."))
    interval_s: float = Field(15.0, gt=0, description=(
        "Seconds between decisions; a decision changes a backend's cap at most once per interval "
        "(fast_raise and slo_target also move caps between decisions, every 100 ms)."))
    # Under routing.objective: carbon the caps work against the carbon cut at light load
    # (docs/carbon.md): parking alone cut grams 33-38 % with the SLO kept, caps and parking 8-24 %.
    caps: bool = Field(True, description=(
        "Set power caps (apply mode); false: parking only, every GPU at its own limit."))
    # Off by default: +4% tokens/J at 30-60% load on bench/routing's fleet, -7-9% on b200+h100+l4
    # (docs/governor.md, The fast raise).
    fast_raise: bool = Field(False, description=(
        "Choose deeper caps and, between two decisions (every 100 ms), raise a backend's cap at once "
        "when a queue forms on it (advise mode: advice only); false: caps keep burst headroom "
        "under a fixed cap."))
    # Off by default: it trades SLO attainment for energy, which is the operator's call.
    slo_target: float | None = Field(None, gt=0.5, lt=1.0, description=(
        "Attainment target: the share of requests that must meet routing.slo (e.g. 0.95). Set, the "
        "governor (apply mode) also holds every GPU to a common clock, lowered while the target "
        "quantile of finished requests' latency stays under the SLO and raised when it does not; "
        "caps go deeper than the learned model alone allows, and between decisions (every 100 ms) a "
        "backend's cap rises while a queue stands on it and comes back once it has gone. Excludes "
        "fast_raise. null: caps from the model only."))

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _one_fast_loop(self) -> GovernorConfig:
        # Both move caps between decisions, each from its own rule; together they undo each other.
        if self.fast_raise and self.slo_target is not None:
            raise ValueError("fast_raise and slo_target exclude each other: with an attainment target "
                             "the caps follow each backend's queue between decisions already")
        return self


class TelemetryConfig(_Strict):
    """OpenTelemetry tracing (proxy/telemetry.py): one span per inference request, exported over
    OTLP/HTTP; needs the `otel` extra."""

    otlp_endpoint: str | None = Field(None, description=(
        "Base URL of an OTLP/HTTP collector, e.g. `http://otel-collector:4318` (spans go to "
        "`/v1/traces` under it). null: the `OTEL_EXPORTER_OTLP_ENDPOINT` environment variable "
        "turns tracing on; neither set: no tracing."))
    service_name: str = Field("joulegate", min_length=1, description=(
        "The `service.name` resource attribute of the spans."))
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description=(
        "Share of requests that start a new trace (no `traceparent` from the client) which are "
        "traced; the others are sent upstream as not sampled and make no span. A client's "
        "`traceparent` decides for its own requests. Each span costs the proxy about 0.2 ms of CPU."))

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return url


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig, description=(
        "The listener, limits and time-outs."))
    backends: list[BackendConfig] = Field(min_length=1, description="The inference servers (at least one).")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description=(
        "How a backend is chosen for each request."))
    energy: EnergyConfig = Field(default_factory=EnergyConfig, description=(
        "How measured energy is split among requests."))
    tenants: list[TenantConfig] = Field(default_factory=list, description=(
        "Tenants, their API key digests and budgets."))
    admin_api_keys_sha256: list[str] = Field(default_factory=list, description=(
        "Hex SHA-256 digests of admin keys (see all tenants; billed to 'admin')."))
    anonymous_tenant: str | None = Field(None, description=(
        "Tenant that keyless requests are billed to; null: 401 without a key."))
    ledger: str | None = Field(None, description=(
        "sqlite:///PATH, redis://HOST:PORT/DB, rediss://..., postgresql://USER:PW@HOST/DB or memory://;"
        " options in the query. null:"
        " a SQLite file beside the config."))
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus options.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Replicas sharing backends.")
    energy_budget_failure: Literal["open", "closed"] = Field("open", description=(
        "A budget whose ledger store does not answer within energy_budget_timeout_ms: open lets the "
        "request through, closed refuses it with 503 `energy_budget_unavailable`."))
    energy_budget_timeout_ms: float = Field(50.0, gt=0, description=(
        "Milliseconds a budget hold may wait for the ledger store before it counts as a store "
        "failure (see energy_budget_failure)."))
    rate_limit_failure: Literal["open", "closed"] = Field("open", description=(
        "A rate-limited request whose shared store (Redis, PostgreSQL) does not answer within "
        "rate_limit_timeout_ms: open lets it through, closed refuses it with 503 "
        "`rate_limit_unavailable`."))
    rate_limit_timeout_ms: float = Field(50.0, gt=0, description=(
        "Milliseconds a rate-limit check may wait for the shared store before it counts as a store "
        "failure (see rate_limit_failure)."))
    governor: GovernorConfig = Field(default_factory=GovernorConfig, description=(
        "Power caps per backend (off, advise or apply)."))
    # Host and facility overhead and grid carbon: proxy/carbon.py.
    sites: list[SiteConfig] = Field(default_factory=list, description=(
        "Data centres: name, PUE and grid carbon intensity; backends name theirs with `site:`."))
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description=(
        "OpenTelemetry tracing of inference requests (off unless an OTLP endpoint is set)."))

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
        gram_budgets = [t.name for t in self.tenants if t.energy_budget and t.energy_budget.gco2e is not None]
        siteless = [b.name for b in self.backends if b.site is None]
        if gram_budgets and siteless:
            # A backend without a site books no grams: a gram budget would never see its requests.
            raise ValueError(f"tenant '{gram_budgets[0]}' has a gco2e budget, so every backend needs a"
                             f" site: (backend '{siteless[0]}' has none)")
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
        if url is not None and not url.startswith(("sqlite://", "redis://", "rediss://", "memory://",
                                                   "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH, redis://HOST:PORT/DB, postgresql://HOST/DB or memory://")
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
    for site in config.sites:  # a relative CSV is read beside the config file
        if site.carbon.csv is not None:
            site.carbon.csv = str(path.resolve().parent / site.carbon.csv)
    if config.energy.state_file is not None:
        config.energy.state_file = str(path.resolve().parent / config.energy.state_file)
    if config.ledger is None:
        config.ledger = f"sqlite:///{path.resolve().parent / 'joulegate-ledger.db'}"
    return config

# ---- rules the config checks, kept here so the config imports nothing of the proxy ---------
# The relay's allowlist of extra POST routes. An inference engine serves more than inference
# under /v1/ (vLLM: /v1/load_lora_adapter, dev mode /v1/sleep...), and the relay sends the
# backend's own key with them, so only the routes listed are relayed; any other path is the
# proxy's 404 and never leaves it.

#: OpenAI-style inference routes relayed by default (chat/completions, completions and
#: embeddings are the proxy's own routes and always served).
DEFAULT_PASSTHROUGH: tuple[str, ...] = (
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/moderations",
    "/v1/rerank",
    "/v1/score",
    "/v1/tokenize",
    "/v1/detokenize",
)

#: A path that may be listed: `/v1/` and plain segments, at most 1 KiB. The path is appended
#: to the backend's URL, so a dot segment (`/v1/../metrics`) would reach the engine's non-API
#: routes, and `?`, `#` or control characters would change the URL.
PATH_RE = re.compile(r"/v1(?:/(?!\.{1,2}(?:/|$))[A-Za-z0-9._~@:,=+-]+){1,16}")
MAX_PATH_BYTES = 1024


def check_passthrough_path(path: str) -> str:
    """`path` if it may be passed through, else ValueError saying why."""
    if len(path) > MAX_PATH_BYTES or not PATH_RE.fullmatch(path):
        raise ValueError(f"{path!r} is not a /v1/... path of plain segments")
    return path


def resolve_passthrough(replace: list[str] | None, add: list[str], remove: list[str]) -> frozenset[str]:
    """The allowlist: `replace` (or the default) plus `add`, less `remove`."""
    base = DEFAULT_PASSTHROUGH if replace is None else replace
    return frozenset(check_passthrough_path(p) for p in (*base, *add)) - set(remove)


#: Options a ledger URL's query may set (open_ledger applies them; the config rejects bad ones): name -> (the store option it sets, its parser, stores).
_LEDGER_URL_OPTIONS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "retention_days": ("retention_s", lambda v: _positive_number(v) * 86_400.0, ("memory", "sqlite", "redis", "postgres")),
    "flush_interval_s": ("flush_interval_s", lambda v: _positive_number(v), ("memory", "sqlite", "redis", "postgres")),
    "max_buffer": ("max_buffer", lambda v: int(_positive_number(v)), ("memory", "sqlite", "redis", "postgres")),
    "journal_path": ("journal_path", str, ("sqlite", "redis", "postgres")),
    "busy_timeout_s": ("busy_timeout_s", lambda v: _positive_number(v), ("sqlite",)),
    "synchronous": ("synchronous", str, ("sqlite",)),
    "key_prefix": ("key_prefix", str, ("redis",)),
    "socket_timeout_s": ("socket_timeout_s", lambda v: _positive_number(v), ("redis",)),
    # PostgreSQL: connection wait (s), pool connections per process, libpq's sslmode.
    "connect_timeout_s": ("connect_timeout_s", lambda v: _positive_number(v), ("postgres",)),
    "pool_size": ("pool_size", lambda v: int(_positive_number(v)), ("postgres",)),
    "sslmode": ("sslmode", str, ("postgres",)),
}


def _positive_number(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _ledger_store(url: str) -> str:
    if url.startswith(("postgresql:", "postgres:")):
        return "postgres"
    return "memory" if url.startswith("memory:") else "sqlite" if url.startswith("sqlite:") else "redis"


def ledger_options(url: str) -> tuple[str, dict[str, Any]]:
    """The URL without its query, and the store options its query sets. ValueError naming the
    option for one unknown, misplaced (e.g. key_prefix on SQLite) or out of range."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    store, opts = _ledger_store(url), {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in _LEDGER_URL_OPTIONS:
            raise ValueError(f"unknown ledger option {name!r}; known: {', '.join(_LEDGER_URL_OPTIONS)}")
        option, parse, stores = _LEDGER_URL_OPTIONS[name]
        if store not in stores:
            raise ValueError(f"ledger option {name!r} does not apply to a {store} ledger")
        try:
            opts[option] = parse(value)
        except ValueError as exc:
            raise ValueError(f"ledger option {name}={value!r}: {exc}") from None
    if str(opts.get("synchronous", "NORMAL")).upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError("ledger option synchronous must be OFF, NORMAL, FULL or EXTRA")
    return base, opts
