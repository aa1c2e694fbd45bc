"""The seeded workload: the fleet's model, backends and tenants, the configurations (`Setup`),
the request classes, and `make_plan` (bursty, mixed, a pure function of N and the seed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MODEL = "llama-3.1-8b"
BACKENDS = (("h100", "h100-llama3.1-8b"), ("a100", "a100-llama3.1-8b"), ("l4", "l4-llama3.1-8b"))
TENANT_KEYS = {
    "acme": "sk-bench-acme-0001",
    "globex": "sk-bench-globex-0002",
    "initech": "sk-bench-initech-0003",
}
ADMIN_KEY = "sk-bench-admin-0009"


@dataclass(frozen=True)
class Setup:
    """One configuration: a power source and its sampling interval; `skew_s` puts the first
    backend's power-API clock that far off (the proxy's agent source has to estimate it);
    `busy` sends all traffic, closed loop at `--concurrency`, to one H100."""

    source: str  # sim (the agent API stream) | dcgm (scrape of /metrics)
    interval_s: float
    skew_s: float = 0.0
    busy: bool = False

    @property
    def name(self) -> str:
        iv = f"{round(self.interval_s * 1000)}ms" if self.interval_s < 1 else f"{self.interval_s:g}s"
        name = f"{'busy' if self.busy else self.source}@{iv}"
        return name + (f"+skew{self.skew_s:g}s" if self.skew_s else "")

    @property
    def backends(self) -> tuple[tuple[str, str], ...]:
        return BACKENDS[:1] if self.busy else BACKENDS


DEFAULT_SETUPS = (Setup("sim", 0.1), Setup("sim", 0.1, skew_s=2.5), Setup("sim", 1.0),
                  Setup("dcgm", 1.0), Setup("sim", 0.1, busy=True), Setup("sim", 1.0, busy=True))
QUICK_SETUPS = (Setup("sim", 0.1, skew_s=2.5), Setup("sim", 1.0), Setup("sim", 0.1, busy=True))
# Request classes every figure is reported for (prompts of LONG_PROMPT_TOKENS and more are long).
CLASSES = ("chat", "long", "embedding")
LONG_PROMPT_TOKENS = 2000


@dataclass(frozen=True)
class Planned:
    """One request of the seeded workload; `at_s` is its arrival after the workload starts."""

    index: int
    at_s: float
    tenant: str
    kind: str  # chat | completion | embedding
    stream: bool
    include_usage: bool
    prompt_tokens: int  # what the simulator will count (ceil(chars / 4) + 3 per chat message)
    max_tokens: int  # 0 for embeddings
    inputs: int = 1  # embeddings: how many input strings
    abort_after: int = 0  # streams: the client drops the stream after this many tokens (0: never)

    @property
    def cls(self) -> str:
        """chat | long | embedding (the classes figures are reported for)."""
        if self.kind == "embedding":
            return "embedding"
        return "long" if self.prompt_tokens >= LONG_PROMPT_TOKENS else "chat"


# Per tenant: share of the traffic, chance of embeddings / legacy completions / a long
# (2-8k token) prompt, chance that a generation is streamed and that a stream is dropped by the
# client mid-way, median prompt and output tokens.
TENANT_MIX = {
    "acme": dict(share=0.40, p_embed=0.00, p_legacy=0.10, p_long=0.05, p_stream=0.80,
                 p_abort=0.15, prompt=120, output=40),
    "globex": dict(share=0.35, p_embed=0.25, p_legacy=0.05, p_long=0.35, p_stream=0.30,
                   p_abort=0.10, prompt=600, output=110),
    "initech": dict(share=0.25, p_embed=0.10, p_legacy=0.40, p_long=0.15, p_stream=0.55,
                    p_abort=0.10, prompt=250, output=70),
}


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def make_plan(n: int, seed: int) -> list[Planned]:
    """The workload for `seed`: bursts (mean 14 requests, ~50 ms apart) separated by idle gaps
    (mostly 0.4-1.2 s, one in five 2-3.5 s); prompts 20..2000 tokens (long ones 2000..8000)
    and outputs 8..512 tokens, log-normal per tenant; some streams dropped mid-way."""
    rng = random.Random(seed)
    tenants = list(TENANT_MIX)
    weights = [TENANT_MIX[t]["share"] for t in tenants]
    plan: list[Planned] = []
    t_s = 0.0
    while len(plan) < n:
        burst = min(n - len(plan), 1 + int(rng.expovariate(1 / 13)))
        for _ in range(burst):
            t_s += rng.expovariate(1 / 0.05)
            tenant = rng.choices(tenants, weights)[0]
            mix = TENANT_MIX[tenant]
            prompt = _lognormal_int(rng, mix["prompt"], 1.0, 20, LONG_PROMPT_TOKENS - 1)
            if rng.random() < mix["p_long"]:
                prompt = _lognormal_int(rng, 4000, 0.5, LONG_PROMPT_TOKENS, 8000)
            if rng.random() < mix["p_embed"]:
                plan.append(Planned(len(plan), t_s, tenant, "embedding", False, False, prompt, 0,
                                    inputs=rng.randint(1, 4)))
                continue
            kind = "completion" if rng.random() < mix["p_legacy"] else "chat"
            stream = rng.random() < mix["p_stream"]
            include_usage = stream and rng.random() < 0.7
            output = _lognormal_int(rng, mix["output"], 0.9, 8, 512)
            abort_after = 0
            if stream and output >= 16 and rng.random() < mix["p_abort"]:
                abort_after = rng.randint(2, output // 2)
            plan.append(Planned(len(plan), t_s, tenant, kind, stream, include_usage, prompt, output,
                                abort_after=abort_after))
        t_s += rng.uniform(0.4, 1.2) if rng.random() < 0.8 else rng.uniform(2.0, 3.5)
    return plan


_FILLER = "".join(f"joule{i % 97} watt{i % 89} " for i in range(2000))


def _text(chars: int, salt: int) -> str:
    """Exactly `chars` characters of filler (varied a little per request)."""
    start = (salt * 131) % 1000
    return (_FILLER[start:] + _FILLER)[:chars]


def _embedding_inputs(p: Planned) -> list[str]:
    """`p.inputs` strings whose ceil(len / 4) sum to p.prompt_tokens."""
    k = max(1, min(p.inputs, p.prompt_tokens))
    sizes = [p.prompt_tokens // k + (1 if i < p.prompt_tokens % k else 0) for i in range(k)]
    return [_text(4 * s, p.index + i) for i, s in enumerate(sizes)]
