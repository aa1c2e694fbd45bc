"""Scripted fault scenarios (issue 7 item 3): real processes on real sockets, one module a family.

1. test_backend_killed.py   SIGKILL one of three sims under c=32 streams, restart it on its port
2. test_hung_backend.py     a backend that never answers: 504 in time, booked; the circuit stays closed
3. test_garbage_backend.py  not HTTP, a 200 that is not JSON, SSE garbage: clean 502 / error event
4. test_cut_stream.py       a stream cut in the middle of an event
5. test_redis_outage.py     the ledger's Redis gone 10 s and back, under streamed load
6. test_proxy_sigterm.py    SIGTERM to the proxy with streams running: drained and billed
7. test_power_gone.py       the power source gone 30 s: modelled as `estimated`, then measured
8. test_slow_client.py      a client that stops reading: cut and billed; a slow sender: 408
9. test_booking.py          booked once with its status: a late backend (504, with energy), a client
                           that leaves (499, upstream closed within 1 s), stream idle gap and cap
10. test_slots.py           a stale keep-alive retried, a 1 KB/s reader frees its slot, a 3x
                           max_in_flight flood answered 429

conftest.py keeps each scenario's figures and prints them as one table at the end of the run;
servers.py has the misbehaving backends, load.py the clients, ledgers.py the ledger readers,
tcp_relay.py a TCP link that can be cut.
"""
