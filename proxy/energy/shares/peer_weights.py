"""The other replicas' published weights for one backend, merged into one step function.

Each replica publishes chunks of its local (weight density, in-flight count) step function;
`PeerWeights` keeps each peer's steps, declares a silent peer dead, and hands out their sum up
to the watermark every live peer has published to. Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter

from proxy.energy.attribution.foreign import Step

__all__ = ["Chunk", "PeerWeights", "Step"]

Chunk = tuple[float, float, list[Step]]  # over [from_s, until_s): these steps

_ZERO_STEP = (0.0, 0)
_FIRST_t = itemgetter(0)


@dataclass(slots=True)
class _Peer:
    steps: list[Step] = field(default_factory=list)  # sorted by time
    until_s: float | None = None  # its weights are published up to here; None: no samples yet
    seen_ms: int = 0  # Redis time (stream id) of its newest entry
    dead: bool = False
    load_density: float = 0.0  # its rough weight density now (for estimates only)

    def push(self, t_s: float, density: float, count: int) -> None:
        steps = self.steps
        while steps and steps[-1][0] >= t_s:  # a newer word on the same time
            steps.pop()
        steps.append((t_s, density, count))

    def die(self) -> None:
        """From the end of what it published on, it weighs nothing."""
        self.dead = True
        if self.until_s is not None and (not self.steps or self.steps[-1][1:] != _ZERO_STEP):
            self.push(self.until_s, 0.0, 0)


class PeerWeights:
    """Other replicas' published weights for one backend, merged into one step function.

    Pure: no I/O, no clock reads. `add` takes each peer's chunks as they are read; `merge`
    hands out the sum over peers as steps (t_s, density, count) from `fed_until_s` to the
    watermark: the earliest `until_s` of the live peers (`now_s` when there is none).
    """

    def __init__(self, since_s: float) -> None:
        self.fed_until_s = since_s
        self.peers: dict[str, _Peer] = {}
        self._fed: tuple[float, int] | None = _ZERO_STEP  # the sum in force at fed_until_s

    def add(self, peer_id: str, chunks: Iterable[Chunk], seen_ms: int, leaving: bool = False,
            load_density: float = 0.0) -> None:
        """One entry of `peer_id`, written at `seen_ms` (Redis time, ms); `load_density`: its
        rough weight density at the time (weight/s), for estimates."""
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = _Peer()
        if seen_ms >= peer.seen_ms:
            peer.load_density = load_density
        peer.seen_ms = max(peer.seen_ms, seen_ms)
        if peer.dead and not leaving:
            peer.dead = False  # only slow, not gone: what it publishes from now on counts
        for _from_s, until_s, steps in chunks:
            for t_s, density, count in steps:
                peer.push(t_s, density, count)
            if peer.until_s is None or until_s > peer.until_s:
                peer.until_s = until_s
        if leaving:
            peer.die()

    def skip_to(self, t_s: float) -> None:
        """Something else stood in for the peers up to `t_s` (a Redis outage): resume there."""
        if t_s > self.fed_until_s:
            self.fed_until_s = t_s
            self._fed = None  # re-send the sum at the next merge

    def live_peers(self) -> int:
        return sum(1 for p in self.peers.values() if not p.dead)

    def load_density(self) -> float:
        """The live peers' rough weight density now (weight/s), for estimates."""
        return math.fsum(p.load_density for p in self.peers.values() if not p.dead)

    def merge(self, now_s: float, now_ms: int, peer_timeout_ms: int
              ) -> tuple[list[Step], float]:
        """The summed steps over [fed_until_s, watermark), and the watermark."""
        peers = self.peers
        for peer in peers.values():
            if not peer.dead and now_ms - peer.seen_ms > peer_timeout_ms:
                peer.die()
        waits = [p.until_s for p in peers.values() if not p.dead and p.until_s is not None]
        until_s = min(waits) if waits else now_s
        lo_s = self.fed_until_s
        out: list[Step] = []
        if until_s <= lo_s:
            return out, lo_s
        values: dict[str, tuple[float, int]] = {}
        changes: list[tuple[float, str, float, int]] = []
        for peer_id, peer in peers.items():
            steps = peer.steps
            k = bisect_right(steps, lo_s, key=_FIRST_t)
            values[peer_id] = steps[k - 1][1:] if k > 0 else _ZERO_STEP
            for m in range(k, len(steps)):
                t_s, density, count = steps[m]
                if t_s >= until_s:
                    break
                changes.append((t_s, peer_id, density, count))
            if k > 1:
                del steps[:k - 1]  # keep the step in force at lo_s

        def emit(t_s: float) -> None:
            total = (math.fsum(v[0] for v in values.values()), sum(v[1] for v in values.values()))
            if total != self._fed:
                out.append((t_s, *total))
                self._fed = total

        emit(lo_s)
        changes.sort(key=_FIRST_t)
        i, n = 0, len(changes)
        while i < n:
            t_s = changes[i][0]
            while i < n and changes[i][0] == t_s:
                _, peer_id, density, count = changes[i]
                values[peer_id] = (density, count)
                i += 1
            emit(t_s)
        for peer_id in [pid for pid, p in peers.items()
                        if p.dead and (p.until_s is None or p.until_s <= until_s)]:
            del peers[peer_id]
            if values.get(peer_id, _ZERO_STEP) != _ZERO_STEP:
                self._fed = None  # its last value leaves the sum at the next merge
        self.fed_until_s = until_s
        return out, until_s
