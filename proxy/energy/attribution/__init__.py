"""Per-request energy attribution for one backend, incremental and conserving.

The method (shared/reference/gpu-energy.md, "Attribution"): cut the backend's energy timeline at
every sample, request start, first token and request end; split each slice's joules among the
requests in flight by weight; slices with nothing in flight are idle energy.

How it is computed. Inside one sample interval [a, b] power P is constant. Each request gets a
piecewise-constant weight density (weight per second):
  - streamed, prefill:  prefill_weight * prompt over [from, first], `from` the end of the step
                        before the one that ended with its first token (steps.py; its start
                        if none): its prompt went through there, not while it queued
  - streamed, decode:   tokens that arrived in (a, b], over [first, end] within [a, b] in
                        proportion to the decode steps the streams show there (steps.py)
  - non-streamed:       prefill_weight * prompt over [start, start + the TTFT streams of that
                        prompt length saw], its tokens over the steps seen after that; flat
                        (prefill_weight * prompt + completion) / (end - start) before any stream
(weights.py adds optional length and context terms to these weights: a long prompt and a token
over a long context weigh more; proxy/energy/learn.py learns them per backend.)
A request's joules in [a, b] are the integral of P * rho_r / W (W = sum of densities), which one
sweep over the interval's boundaries computes with a running integral of P / W, in
O(k log k) for k requests overlapping the interval. Where requests are in flight but W is zero
(between token arrivals) they split that energy equally. Each interval's shares are then scaled
to its busy joules exactly, so `attributed + idle (+ carried) == measured` holds to rounding.

An interval stays pending until its end sample has arrived and every request overlapping it has
known weights (a non-streamed request's tokens are known only at its end; a streamed request's
prefill density needs its first token time and its prompt size). Intervals are finalized oldest
first. Pending work older than `max_pending_s` is forced through with provisional weights, so
memory stays bounded whatever the callers do.

Events reported late (a start or token whose time is already settled) count in the next open
interval; energy before the first sample is unknown and billed to no one.

Other replicas. When several proxies (or workers) send requests to the same backend, each one
sees only its own requests. The others' total weight density arrives as a step function of time
(`set_foreign`, fed by proxy/energy/shares/) and counts in W like a request of nobody's here:
its share of every slice is booked as `finalized_joules_foreign` (another replica bills it). The
split is the same as one proxy holding every request would make: each replica publishes the
local density function it weighs its own intervals with (`take_local`), so the shares add up to
the backend's busy energy. Settling therefore has two phases: an interval is first *weighed*
(local densities fixed: what a replica publishes) and then *split* once foreign data covers it
(`foreign_until_s`), or `foreign_max_wait_s` after its end with the last known foreign value.
Without foreign data (`foreign_until_s` infinite, the default) both phases run back to back.

Idle energy (nothing in flight, here or at another replica): `separate` books it as idle.
`share` carries it forward and adds it to the next moment something is in flight, split there by
weight; an idle stretch longer than `share_max_s` is booked as idle instead, so one request never
pays for a night of idle.

Where each part lives (one idea per module):
  request.py      one request's state while unsettled; `Estimate` and `Final`
  weights.py      what a prompt, an embedding and a generated token weigh
  steps.py        the decode step clock read off the streams: where decode work lay
  ttft.py         streams' time to first token against prompt length
  unsettled.py    the unsettled requests and what is known of their weights
  weighing.py     phase one: the local weight densities of one interval
  split.py        phase two, the split rule: one interval's joules among requests, peers, idle
  books.py        the final booking: attributed, idle, carried, foreign joules
  provisional.py  the estimate before samples arrive: learned rates, provisional weights
  foreign.py      the weights crossing replicas: the others' step function, this one's own
  attributor.py   `Attributor`: the live state that drives the above, interval by interval
  restate.py      `ColdStart`: a cold start's finals held, then settled again with learned weights
  schedule.py     `attribute_schedule`: a whole recorded schedule, offline
  sums.py         compensated running sums

Pure: no I/O, no clock reads; times are seconds on one clock, passed in.
"""

from proxy.energy.attribution.attributor import Attributor, IdleMode
from proxy.energy.attribution.request import Estimate, Final, Method
from proxy.energy.attribution.schedule import ScheduledRequest, attribute_schedule

__all__ = [
    "Attributor", "Estimate", "Final", "IdleMode", "Method", "ScheduledRequest",
    "attribute_schedule",
]
