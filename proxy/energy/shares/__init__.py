"""Many replicas, one backend: each proxy bills only its share of the backend's energy.

Every proxy replica (or uvicorn worker) that sends requests to a backend measures the same GPU
energy but sees only its own requests. Left alone, each would split the whole measured energy
among its own requests, and N replicas would bill the fleet N times over. So the replicas
exchange their weights through Redis, off the request path:

- Each replica's attributor fixes its local weight density (weight/s, the units of
  attribution.py) over each sample interval before it splits the interval ("weighing"). Every
  `heartbeat_s` the exchange takes what was weighed since the last heartbeat (`take_local`: a
  step function of (density, in-flight count) over [from_s, until_s)) for every backend and
  sends it in ONE pipelined round trip: per backend an XADD to the stream
  `<prefix>w:<backend>` (entry `r` = replica id, `d` = the steps), a PEXPIRE, and one XREAD of
  all those streams since the last entry read.
- The other replicas' steps for a backend are merged into one step function (`PeerWeights`)
  and fed to the local attributor (`set_foreign`) up to the watermark `foreign_until_s`: the
  earliest time up to which every live peer has published. An interval is split once the
  watermark passes its end (or `max_wait_s` after it, with the last known values). Each
  replica then splits with the same global weights a single proxy holding every request would
  use, so the replicas' shares add up to the backend's busy energy, whatever their number
  (tests/test_shares.py checks it against one attributor holding every request). A replica
  weighs an interval only once its own requests' weights are known (a non-streamed request's
  at its end), so the fleet finalizes as late as one proxy holding every request would.
- Each entry also carries the replica's rough load now (requests in flight x recent weight
  per request), summed into `foreign_estimate_density`: estimates made before the final
  split (response headers, budgets) count the others' open requests too.
- A peer whose newest entry is older than `peer_timeout_s` (Redis's clock: the stream ids) is
  dead: its weight is 0 after what it published, and it stops holding the watermark back. A
  replica that shuts down says so in its last entry.
- Redis unreachable: engine metrics stand in (per backend with `metrics_url`): foreign running
  requests = min(running, running + waiting - in flight here), each weighing what one request in
  flight here recently weighed (scraped every `engine_scrape_s`); without engine metrics the others count for nothing (a lone proxy's
  behaviour). Logged once per change; `state()` and the metrics say which source is in use.
  Without any Redis URL, engine metrics are the only source (e.g. `serve --workers N`).

Where each part lives: peer_weights.py (the others' steps merged, pure), wire.py (what an
entry holds, and Redis's replies), exchange.py (`WeightExchange`, `make_exchange`: the
heartbeat), metrics.py (its Prometheus series).

Redis load: 10 round trips a second per replica, whatever the request rate; entries are trimmed
to `retain_s` (XADD MINID) and the keys expire when every replica is gone.
"""

from proxy.energy.shares.exchange import WeightExchange, make_exchange, new_replica_id
from proxy.energy.shares.peer_weights import Chunk, PeerWeights, Step
from proxy.energy.shares.wire import decode_chunks, encode_chunks

__all__ = [
    "Chunk", "PeerWeights", "Step", "WeightExchange", "decode_chunks", "encode_chunks",
    "make_exchange", "new_replica_id",
]
