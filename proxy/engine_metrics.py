"""Read an inference engine's Prometheus page into load gauges, whatever the engine.

The engine is recognised by the metric names it exposes (vLLM, SGLang, TGI, llama.cpp), not
by configuration; labelled series (per model, per engine) are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

#: (running, waiting, cache pressure) metric names per engine, in the order tried.
_ENGINE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"),
    ("tgi_batch_current_size", "tgi_queue_size", "tgi_batch_current_max_tokens"),
    ("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:n_busy_slots_per_decode"),
)
_DEPRECATED_CACHE = {"vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc"}


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Load an engine reports: requests running and waiting, cache pressure (engine units)."""

    running: int
    waiting: int
    cache_usage: float | None = None


def parse_engine_load(text: str) -> EngineLoad | None:
    """Sum each known gauge over its label sets; None when no known engine's names appear."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    for old, new in _DEPRECATED_CACHE.items():
        if old in sums:
            sums.setdefault(new, sums[old])
    for running, waiting, cache in _ENGINE_NAMES:
        if running in sums or waiting in sums:
            return EngineLoad(
                running=int(sums.get(running, 0.0)),
                waiting=int(sums.get(waiting, 0.0)),
                cache_usage=sums.get(cache),
            )
    return None
