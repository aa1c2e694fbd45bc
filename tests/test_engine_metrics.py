"""proxy/engine_metrics.py: load gauges from vLLM, SGLang, TGI and llama.cpp Prometheus pages."""

from __future__ import annotations

import pytest

from proxy.engine_metrics import EngineLoad, parse_engine_load

VLLM = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 98765.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 40.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 40.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.5
"""

VLLM_TWO_ENGINES = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 4.0
vllm:num_requests_running{engine="1",model_name="llama"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 1.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 2.0
"""

VLLM_OLD = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 2.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="llama"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 6.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="llama"} 0.75
"""

# During the rename vLLM exposes both names for the same gauge.
VLLM_BOTH_CACHE_NAMES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. DEPRECATED: use vllm:kv_cache_usage_perc.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="llama"} 0.3
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.3
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct"} 12.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{model_name="Qwen/Qwen2.5-7B-Instruct"} 4096.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="Qwen/Qwen2.5-7B-Instruct"} 0.25
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="Qwen/Qwen2.5-7B-Instruct"} 812.5
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct"} 4.0
"""

TGI = """\
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 2048
# TYPE tgi_queue_size gauge
tgi_queue_size 2
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_request_count counter
tgi_request_count 100
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 10
tgi_request_duration_bucket{le="+Inf"} 100
tgi_request_duration_sum 150.5
tgi_request_duration_count 100
"""

LLAMA_CPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 2048
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 512
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 1500.2
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.1
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 2.5
"""

DCGM = """\
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-abc",device="nvidia0",modelName="NVIDIA H100 80GB HBM3"} 312.5
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-abc"} 123456789
"""


def test_vllm() -> None:
    load = parse_engine_load(VLLM)
    assert load == EngineLoad(running=7, waiting=3, cache_usage=pytest.approx(0.42))
    assert isinstance(load.running, int) and isinstance(load.waiting, int)


def test_vllm_sums_label_sets() -> None:
    load = parse_engine_load(VLLM_TWO_ENGINES)
    assert load is not None
    assert (load.running, load.waiting) == (9, 3)
    assert load.cache_usage is None


def test_vllm_deprecated_cache_gauge() -> None:
    load = parse_engine_load(VLLM_OLD)
    assert load is not None
    assert (load.running, load.waiting) == (2, 6)
    assert load.cache_usage == pytest.approx(0.75)


def test_vllm_deprecated_and_new_cache_gauge_are_not_added() -> None:
    """Both names report the same cache; their sum (0.6) would be a cache that is not there."""
    load = parse_engine_load(VLLM_BOTH_CACHE_NAMES)
    assert load is not None
    assert load.cache_usage == pytest.approx(0.3)


def test_vllm_only_waiting_gauge() -> None:
    load = parse_engine_load('# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 4\n')
    assert load == EngineLoad(running=0, waiting=4, cache_usage=None)


def test_vllm_idle_is_a_load_not_none() -> None:
    load = parse_engine_load(VLLM_TWO_ENGINES.replace(" 4.0", " 0.0").replace(" 5.0", " 0.0")
                             .replace(" 1.0", " 0.0").replace(" 2.0", " 0.0"))
    assert load == EngineLoad(running=0, waiting=0, cache_usage=None)


def test_sglang() -> None:
    load = parse_engine_load(SGLANG)
    assert load is not None
    assert (load.running, load.waiting) == (12, 4)
    assert load.cache_usage == pytest.approx(0.25)


def test_tgi() -> None:
    load = parse_engine_load(TGI)
    assert load is not None
    assert (load.running, load.waiting) == (5, 2)
    assert load.cache_usage == pytest.approx(2048)


def test_llama_cpp() -> None:
    load = parse_engine_load(LLAMA_CPP)
    assert load is not None
    assert (load.running, load.waiting) == (3, 1)


@pytest.mark.parametrize("page", [DCGM, "", "# just a comment\n", "up 1\nprocess_cpu_seconds_total 3.5\n"])
def test_unknown_page_is_none(page: str) -> None:
    assert parse_engine_load(page) is None


def test_simulator_page_reads_as_vllm() -> None:
    """The simulator serves vLLM-style gauges beside DCGM-style power on one page."""
    page = DCGM + VLLM_TWO_ENGINES
    load = parse_engine_load(page)
    assert load is not None and (load.running, load.waiting) == (9, 3)
