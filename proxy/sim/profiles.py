"""GPU profiles for the simulator: step time and board power per kind of work.

Decode: a step's time is the weights read (shared by the batch) plus per-request work plus the
KV-cache reads of every running request's context; power follows the measured curve, which
saturates with batch. Prefill: linear plus quadratic (attention) in prompt length, at its own
power. Embeddings: a bidirectional encoder pass, no decode, at its own power.

Every number is either MEASURED (copied from shared/reference/mlenergy-v3-llama31.csv, the
ML.ENERGY leaderboard v3 run of Llama-3.1-8B under vLLM 0.11.1) or DERIVED (from the measured
H100 curve and the ratios in shared/reference/gpu-energy.md). docs/simulator.md says which is
which and how each derived number was obtained.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

__all__ = ["GpuProfile", "PROFILES", "SLEEP_POWER_RATIO", "get_profile", "profile_names"]

#: Sleep power over idle power (vLLM sleep mode: weights offloaded, KV cache dropped). DERIVED,
#: not measured: the board still idles its clocks and fans; half its idle draw is this
#: project's assumption, not a figure from a GPU.
SLEEP_POWER_RATIO = 0.5


@dataclass(frozen=True)
class GpuProfile:
    """One GPU running one model under a vLLM-like engine.

    `decode_points` is a table of `(batch, step_time_s, power_w)` sorted by batch: the wall time
    of one decode step (one token for every running request) and the board power while it runs.
    """

    name: str
    gpu_name: str
    model_name: str
    max_batch: int
    idle_w: float
    prefill_s_per_token: float
    prefill_power_w: float
    decode_points: tuple[tuple[float, float, float], ...]
    board_limit_w: float
    # Below the first table point power falls this much per halving of the batch (the H100
    # curve drops 27 W from b=16 to b=8 and the drop steepens as the GPU empties).
    low_batch_w_per_halving: float = 40.0
    # Prompt tokens admitted per step, like vLLM's max_num_batched_tokens: bounds how long one
    # admission wave can stall the running decodes.
    max_prefill_tokens: int = 8192
    max_context_tokens: int = 131072
    measured: bool = False
    source: str = ""
    # HBM bandwidth in bytes/s (vendor spec sheet): prices the KV-cache reads of decode.
    hbm_bytes_per_s: float = 3.35e12
    # DERIVED, Llama-3.1-8B architecture: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes.
    kv_bytes_per_token: float = 131_072.0
    # DERIVED: mean context (prompt + half the output) of a running request in the ML.ENERGY
    # run the decode curve comes from. Its 389 output tokens per request are MEASURED
    # (J_per_request / J_per_output_token, 176.8 / 0.4548 on H100); ~150-token prompts are an
    # assumption for lm-arena-chat turns. The curve is the step time at this context.
    ref_context_tokens: float = 350.0
    # DERIVED: prompt length at which prefill's quadratic attention term equals its linear term.
    # Linear: 2 x 8e9 FLOP per token; causal attention: 2 x 4096 x 32 x L FLOP per token
    # (crossover ~61k tokens at equal efficiency); attention kernels run at about half the
    # GEMMs' efficiency, so ~30k.
    attention_crossover_tokens: float = 30_000.0
    # DERIVED: an embedding pass skips the LM head (1.05 of 16 GFLOP per token) ...
    embed_linear_ratio: float = 0.93
    # ... and attends bidirectionally (twice the causal attention work: crossover halves).
    embed_crossover_ratio: float = 0.5
    # DERIVED: short encoder batches keep the GPU less busy than prefill: power above idle is
    # this fraction of prefill's.
    embed_power_ratio: float = 0.85
    _batches: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _log2_batches: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pts = self.decode_points
        if len(pts) < 2 or any(b1 <= b0 for (b0, _, _), (b1, _, _) in zip(pts, pts[1:], strict=False)):
            raise ValueError(f"{self.name}: decode_points need >= 2 points sorted by batch")
        # Frozen dataclass: the bisect keys are derived once here.
        object.__setattr__(self, "_batches", tuple(p[0] for p in pts))
        object.__setattr__(self, "_log2_batches", tuple(math.log2(p[0]) for p in pts))

    def step_time_s(self, batch: float) -> float:
        """Seconds for one decode step of `batch` running requests (0 for an empty batch).

        Linear in batch between table points; below the first point the line through the
        first two points (clamped to a non-negative slope); above the last point, the last value.
        """
        if batch <= 0:
            return 0.0
        pts = self.decode_points
        if batch <= pts[0][0]:
            (b0, t0, _), (b1, t1, _) = pts[0], pts[1]
            slope = max(0.0, (t1 - t0) / (b1 - b0))
            return max(t0 - slope * (b0 - batch), 0.1 * t0)
        if batch >= pts[-1][0]:
            return pts[-1][1]
        i = bisect.bisect_right(self._batches, batch)
        (b0, t0, _), (b1, t1, _) = pts[i - 1], pts[i]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)

    def power_w(self, batch: float) -> float:
        """Board power in W during a decode step of `batch` requests (idle_w for an empty batch).

        Piecewise linear in log2(batch), because measured power is strongly concave in batch;
        never below idle, never above the board limit.
        """
        if batch <= 0:
            return self.idle_w
        pts = self.decode_points
        if batch <= pts[0][0]:
            p = pts[0][2] - self.low_batch_w_per_halving * math.log2(pts[0][0] / batch)
        elif batch >= pts[-1][0]:
            p = pts[-1][2]
        else:
            i = bisect.bisect_right(self._batches, batch)
            x0, x1 = self._log2_batches[i - 1], self._log2_batches[i]
            p0, p1 = pts[i - 1][2], pts[i][2]
            p = p0 + (p1 - p0) * (math.log2(batch) - x0) / (x1 - x0)
        return min(max(p, self.idle_w), self.board_limit_w)

    @property
    def sleep_w(self) -> float:
        """Board power in W while the engine sleeps (parked): `SLEEP_POWER_RATIO` x idle."""
        return SLEEP_POWER_RATIO * self.idle_w

    @property
    def kv_s_per_context_token(self) -> float:
        """Seconds one decode step spends reading one context token's KV cache."""
        return self.kv_bytes_per_token / self.hbm_bytes_per_s

    @property
    def decode_s_per_request(self) -> float:
        """Per-request decode work besides the KV reads (sampling, per-row GEMM work), in s:
        the slope of the measured curve through its first two points, less the KV reads at
        the reference context."""
        (b0, t0, _), (b1, t1, _) = self.decode_points[0], self.decode_points[1]
        return max(0.0, (t1 - t0) / (b1 - b0) - self.kv_s_per_context_token * self.ref_context_tokens)

    def decode_costs_s(self, contexts: list[int]) -> tuple[float, list[float]]:
        """One decode step over requests with these context lengths (tokens): its duration in s,
        and each request's part of it (the shared weights read split equally, plus its own
        per-request work and KV reads). The parts sum to the duration.

        The duration is the measured curve at this batch, moved by the KV reads of the actual
        contexts against the reference context, never below half the batch-1 step.
        """
        b = len(contexts)
        if b == 0:
            return 0.0, []
        kv_s = self.kv_s_per_context_token
        own = [self.decode_s_per_request + kv_s * c for c in contexts]
        step_s = self.step_time_s(b) + kv_s * (sum(contexts) - b * self.ref_context_tokens)
        step_s = max(step_s, 0.5 * self.step_time_s(1))
        shared_s = step_s - math.fsum(own)
        if shared_s < 0:  # very long contexts: the KV reads are the whole step
            scale = step_s / math.fsum(own)
            return step_s, [x * scale for x in own]
        return step_s, [shared_s / b + x for x in own]

    def prefill_s(self, prompt_tokens: int) -> float:
        """Seconds to prefill one prompt: linear (GEMMs) plus quadratic (causal attention)."""
        n = prompt_tokens
        return self.prefill_s_per_token * (n + n * n / self.attention_crossover_tokens)

    def embed_s(self, prompt_tokens: int) -> float:
        """Seconds of one embedding (encoder) pass: no LM head, bidirectional attention."""
        n = prompt_tokens
        crossover = self.attention_crossover_tokens * self.embed_crossover_ratio
        return self.prefill_s_per_token * self.embed_linear_ratio * (n + n * n / crossover)

    @property
    def embed_power_w(self) -> float:
        """Board power in W during an embedding pass."""
        return self.idle_w + self.embed_power_ratio * (self.prefill_power_w - self.idle_w)

    def joules_per_token(self, batch: float) -> float:
        """Decode energy per generated token in J at a steady batch size."""
        return self.power_w(batch) * self.step_time_s(batch) / batch

    def prefill_j_per_token(self) -> float:
        """Prefill energy per prompt token in J, linear part only (short prompts)."""
        return self.prefill_s_per_token * self.prefill_power_w


def _from_mlenergy(rows: tuple[tuple[float, float, float], ...]) -> tuple[tuple[float, float, float], ...]:
    """Turn ML.ENERGY rows `(avg_batch, J_per_output_token, avg_power_W)` into decode points.

    throughput (tok/s) = power / (J per token); step time = avg_batch / throughput.
    """
    return tuple((b, b * jpt / p, p) for b, jpt, p in rows)


# MEASURED: mlenergy-v3-llama31.csv, Llama-3.1-8B on 1xH100 (avg_batch, J/output token, W).
H100_8B_MLENERGY: tuple[tuple[float, float, float], ...] = (
    (8.0, 0.4548, 486.0),
    (16.0, 0.2627, 513.0),
    (31.9, 0.1651, 560.0),
    (63.9, 0.1186, 610.0),
    (95.7, 0.1029, 644.0),
    (127.6, 0.0951, 669.0),
    (191.7, 0.0837, 688.0),
    (255.2, 0.0766, 691.0),
    (383.0, 0.0742, 687.0),
    (510.9, 0.0702, 688.0),
    (690.9, 0.0713, 685.0),
)

# MEASURED: same file, Llama-3.1-8B on 1xB200. Power is noisy across rows (449 W at b=128
# between 617 and 540 W); kept as published rather than smoothed.
B200_8B_MLENERGY: tuple[tuple[float, float, float], ...] = (
    (8.0, 0.3905, 639.0),
    (15.9, 0.2423, 667.0),
    (31.8, 0.1511, 576.0),
    (63.8, 0.1103, 617.0),
    (127.5, 0.0983, 449.0),
    (255.2, 0.0705, 540.0),
    (510.6, 0.0602, 577.0),
    (1021.3, 0.0549, 600.0),
    (2042.9, 0.0467, 691.0),
)

_GEOMETRIC_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _h100_8b() -> GpuProfile:
    return GpuProfile(
        name="h100-llama3.1-8b",
        gpu_name="NVIDIA H100 80GB HBM3",
        model_name="llama-3.1-8b",
        max_batch=256,
        # DERIVED: 75 W bare idle (SplitwiseSim) + ~35 W for a loaded CUDA context (26-50 W).
        idle_w=110.0,
        # DERIVED: 2 x 8e9 FLOP per prompt token at ~400 TFLOP/s effective.
        prefill_s_per_token=0.04e-3,
        # DERIVED: between the 688 W decode plateau and SplitwiseSim's 700 W prompt phase.
        prefill_power_w=650.0,
        decode_points=_from_mlenergy(H100_8B_MLENERGY),
        board_limit_w=700.0,
        hbm_bytes_per_s=3.35e12,  # H100 SXM spec sheet
        measured=True,
        source="decode: ML.ENERGY v3 (measured); idle/prefill: derived",
    )


def _b200_8b() -> GpuProfile:
    return GpuProfile(
        name="b200-llama3.1-8b",
        gpu_name="NVIDIA B200",
        model_name="llama-3.1-8b",
        max_batch=512,
        # DERIVED: H100's 110 W scaled up for the larger board (no public idle figure).
        idle_w=140.0,
        # DERIVED: ~2.2x H100 dense BF16 throughput.
        prefill_s_per_token=0.018e-3,
        prefill_power_w=700.0,
        decode_points=_from_mlenergy(B200_8B_MLENERGY),
        board_limit_w=1000.0,
        hbm_bytes_per_s=8.0e12,  # B200 spec sheet
        measured=True,
        source="decode: ML.ENERGY v3 (measured); idle/prefill: derived",
    )


_H100 = _h100_8b()


def _h100_line() -> tuple[float, float]:
    """Intercept (s) and slope (s per request) of the H100 decode line, `step = a + c * batch`.

    Fitted through the two smallest measured batches: 6.8 ms + 0.089 ms x batch, which also
    lands within 2% of the measured 52 ms at batch 512.
    """
    (b0, t0, _), (b1, t1, _) = _H100.decode_points[0], _H100.decode_points[1]
    slope = (t1 - t0) / (b1 - b0)
    return t0 - slope * b0, slope


# A100/H100 decode step: the fixed part scales by SplitwiseSim's base ratio 57.4/36.7 = 1.56x
# (weight reads: HBM 2.04 vs 3.35 TB/s gives 1.64x, consistent). For the per-request part
# SplitwiseSim's 70B/TP2 ratio 0.48/0.46 = 1.04x would leave an A100 only 1.23x slower than an
# H100 at batch 128 and 27% *cheaper* per token under its 400 W cap, which no public result
# shows; for an 8B model that part is KV-cache reads and GEMM work, so the bandwidth ratio is
# used instead. It keeps SplitwiseSim's other finding: A100 J/token close to H100's at equal batch.
_A100_SLOPE_RATIO = 3.35 / 2.04


def _a100_8b() -> GpuProfile:
    a_s, c_s = _h100_line()
    idle_w, h100_idle_w, cap_w = 95.0, _H100.idle_w, 400.0
    # SplitwiseSim token-phase power above idle: A100 (250-63) vs H100 (380-75).
    above_idle_ratio = (250.0 - 63.0) / (380.0 - 75.0)
    points = tuple(
        (
            float(b),
            1.56 * a_s + _A100_SLOPE_RATIO * c_s * b,
            min(cap_w, idle_w + above_idle_ratio * (_H100.power_w(b) - h100_idle_w)),
        )
        for b in _GEOMETRIC_BATCHES[:8]
    )
    return GpuProfile(
        name="a100-llama3.1-8b",
        gpu_name="NVIDIA A100-SXM4-80GB",
        model_name="llama-3.1-8b",
        max_batch=128,
        # DERIVED: 63 W bare idle (SplitwiseSim) + ~32 W loaded context.
        idle_w=idle_w,
        # DERIVED: H100's 0.04 ms x SplitwiseSim prefill ratio 0.36 / 0.16.
        prefill_s_per_token=0.09e-3,
        # DERIVED: SplitwiseSim A100 prompt phase 400 W (= board limit).
        prefill_power_w=400.0,
        decode_points=points,
        board_limit_w=cap_w,
        hbm_bytes_per_s=2.04e12,  # A100 80GB SXM spec sheet
        source="derived from the H100 profile with SplitwiseSim A100/H100 ratios",
    )


def _l4_8b() -> GpuProfile:
    # Memory-bandwidth bound: 16 GB of BF16 weights / 300 GB/s = 53 ms, + overhead -> 60 ms.
    # Per-request slope: H100's 0.089 ms x compute ratio 989 / 121 TFLOP/s = 0.73 ms.
    base_s, slope_s = 60e-3, 0.73e-3
    points = tuple(
        # Power: 55 W at b=1 rising ~3.5 W per doubling to the 72 W board limit.
        (float(b), base_s + slope_s * b, min(72.0, 55.0 + 3.5 * math.log2(b)))
        for b in _GEOMETRIC_BATCHES[:6]
    )
    return GpuProfile(
        name="l4-llama3.1-8b",
        gpu_name="NVIDIA L4",
        model_name="llama-3.1-8b",
        max_batch=32,
        idle_w=25.0,
        # DERIVED: 16 GFLOP per token at ~40% of 121 TFLOP/s.
        prefill_s_per_token=0.33e-3,
        prefill_power_w=72.0,
        decode_points=points,
        board_limit_w=72.0,
        low_batch_w_per_halving=3.5,
        hbm_bytes_per_s=0.3e12,  # L4 spec sheet
        # 8 GB left for KV cache after the weights: keep admission waves small.
        max_prefill_tokens=4096,
        source="derived: bandwidth/compute scaling of the H100 profile, L4 board limit",
    )


PROFILES: dict[str, GpuProfile] = {
    p.name: p for p in (_H100, _b200_8b(), _a100_8b(), _l4_8b())
}


def profile_names() -> list[str]:
    """Valid profile names, sorted."""
    return sorted(PROFILES)


def get_profile(name: str) -> GpuProfile:
    """The profile called `name`; ValueError naming the valid profiles otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown GPU profile {name!r}; valid profiles: {', '.join(profile_names())}"
        ) from None
