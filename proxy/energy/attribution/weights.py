"""What a request's work weighs in the split, in generated tokens at zero context.

A prompt of L tokens weighs `L * (prefill_weight + prefill_weight_sq * L)` (attention makes long
prompts dearer per token); a generated token over c tokens of context weighs
`1 + decode_context_weight * c` (KV-cache reads). With the two extra terms at 0 (the default)
this is the flat rule: `prefill_weight` per prompt token, 1 per generated token. An embedding
(an encoder pass: no LM head, bidirectional attention, its own power) has its own two terms,
`embed_weight` and `embed_weight_sq`; None: priced like a prompt.
proxy/energy/learn.py learns them per backend.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenWeights"]


@dataclass(slots=True, frozen=True)
class TokenWeights:
    """Split weights; every term >= 0."""

    prefill_weight: float = 0.1
    prefill_weight_sq: float = 0.0  # per prompt token, per prompt token
    decode_context_weight: float = 0.0  # per generated token, per context token
    embed_weight: float | None = None  # per embedded token; None: as prefill
    embed_weight_sq: float = 0.0  # per embedded token, per embedded token
    # A decode step's shared work (reading the weights, the power floor while it runs), split
    # equally among the requests in the step: a generated token in a batch of b weighs
    # `step_weight / b` more. Why a token alone costs many times one in a full batch.
    step_weight: float = 0.0

    def step_share(self, count: float, mean_share: float) -> float:
        """The shared-step weight of `count` tokens each decoded at `mean_share` (1 / batch)."""
        return self.step_weight * count * mean_share

    def prefill(self, prompt_tokens: int) -> float:
        """The weight of prefilling a prompt of this many tokens."""
        return prompt_tokens * (self.prefill_weight + self.prefill_weight_sq * prompt_tokens)

    def prompt(self, prompt_tokens: int, embedding: bool) -> float:
        """The weight of a prompt's pass: an embedding's, or a prefill's."""
        if not embedding or self.embed_weight is None:
            return self.prefill(prompt_tokens)
        return prompt_tokens * (self.embed_weight + self.embed_weight_sq * prompt_tokens)

    def decode(self, context_tokens: int, count: int) -> float:
        """The weight of `count` generated tokens, the first over `context_tokens` of context."""
        if not self.decode_context_weight:
            return float(count)
        return count * (1.0 + self.decode_context_weight * (context_tokens + (count - 1) / 2.0))
