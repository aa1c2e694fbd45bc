"""What goes over Redis: a replica's weight chunks in an entry, and Redis's stream replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.energy.shares.peer_weights import Chunk

__all__ = ["decode_chunks", "encode_chunks", "id_ms", "xread_streams"]


def encode_chunks(chunks: Sequence[Chunk]) -> list[Any]:
    """[[from_s, until_s, [t, density, count, t, ...]], ...]: compact, exact floats (orjson)."""
    out = []
    for from_s, until_s, steps in chunks:
        flat: list[float | int] = []
        for step in steps:
            flat.extend(step)
        out.append([from_s, until_s, flat])
    return out


def decode_chunks(raw: Any) -> list[Chunk]:
    """The inverse of `encode_chunks`; ValueError on anything malformed."""
    chunks: list[Chunk] = []
    if not isinstance(raw, list):
        raise ValueError("chunks must be a list")
    for item in raw:
        from_s, until_s, flat = item
        if len(flat) % 3:
            raise ValueError("steps must be triples")
        steps = [(float(flat[i]), float(flat[i + 1]), int(flat[i + 2]))
                 for i in range(0, len(flat), 3)]
        chunks.append((float(from_s), float(until_s), steps))
    return chunks


def id_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def xread_streams(reply: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """XREAD's answer as (key, entries) pairs, RESP2 (a list) or RESP3 (a dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        items = [(k, v[0] if v and isinstance(v[0], list) and len(v) == 1 else v)
                 for k, v in reply.items()]
    else:
        items = [(k, v) for k, v in reply]
    return [(k if isinstance(k, bytes) else str(k).encode(), v) for k, v in items]
