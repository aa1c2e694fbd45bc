"""What the ledger bills: one finished request (`LedgerRecord`), and the ledger's health.

Units: joules (float) per record; wall-clock seconds since the epoch for times.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.ledger.usage import hour_floor_s

#: Between a request id and its key in `LedgerRecord.uid`; never in an id the relay accepts
#: (x-request-ids are printable).
UID_SEP = "\x1f"
#: Starts a budget subject that is not a tenant (`key_subject`); tenant names have no control
#: characters (config and admin API check), so a subject never collides with a tenant's name.
SUBJECT_MARK = "\x1e"


def key_subject(key_id: str) -> str:
    """The budget subject a managed key's own spend and holds are booked under."""
    return f"{SUBJECT_MARK}key:{key_id}"


def is_subject(name: str) -> bool:
    """True for a budget subject (`key_subject`), False for a tenant."""
    return name.startswith(SUBJECT_MARK)


def subject_hold(key: str) -> str:
    """The hold key of a request's hold on its managed key's budget; its tenant hold is `key`.
    Distinct, as the SQL stores key holds by this alone."""
    return f"{key}{UID_SEP}k"


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One finished request as billed."""

    request_id: str  # the id its client knows (its x-request-id): may repeat, across tenants too
    tenant: str
    model: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    joules: float  # final attributed joules (0.0 when the backend has no power source)
    method: str  # "measured" | "estimated" | "none"
    start_s: float  # wall clock, seconds since the epoch
    end_s: float
    status: int = 200
    key: str = ""  # the proxy's unique id for the request (RequestRecord.key); "" if none
    reasoning_tokens: int = 0  # of completion_tokens, where the engine reported them
    joules_all_in: float = 0.0  # (GPU + host) x PUE (proxy/carbon.py); 0 where not recorded
    gco2e: float = 0.0  # grams CO2e of joules_all_in at the site's grid intensity
    # The budget subject of its managed key (`key_subject`), where that key has a budget of its
    # own: the stores add the record's µJ and µg to this subject's spend as well; "" if none.
    key_subject: str = ""

    @property
    def uid(self) -> str:
        """What stores dedupe on: unique per request served, the same for every copy of one
        record (flush retries, journal replays). Not the client's id alone: a tenant that
        repeated an id, or reused another tenant's, would otherwise go unbilled. The id alone
        where the proxy made it (it is the key then), so most rows look as they always did."""
        if self.key in ("", self.request_id):
            return self.request_id
        return f"{self.request_id}{UID_SEP}{self.key}"

    @property
    def hour_s(self) -> int:
        """The UTC hour (epoch seconds of its start) this record is billed to."""
        return hour_floor_s(self.end_s)

    def to_row(self) -> list[Any]:
        """A compact JSON-able form, used by the journal and the Redis store."""
        return [self.request_id, self.tenant, self.model, self.backend, self.prompt_tokens,
                self.completion_tokens, self.joules, self.method, self.start_s, self.end_s,
                self.status, self.key, self.reasoning_tokens, self.joules_all_in, self.gco2e,
                self.key_subject]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> LedgerRecord:
        """From `to_row`'s form; rows written before keys existed have 11 fields, before
        reasoning tokens 12, before carbon 13, before key budgets 15."""
        return cls(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), int(row[5]),
                   float(row[6]), str(row[7]), float(row[8]), float(row[9]), int(row[10]),
                   str(row[11]) if len(row) > 11 else "", int(row[12] or 0) if len(row) > 12 else 0,
                   float(row[13] or 0.0) if len(row) > 13 else 0.0,
                   float(row[14] or 0.0) if len(row) > 14 else 0.0,
                   str(row[15] or "") if len(row) > 15 else "")


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """A snapshot of the ledger's health, for metrics and /readyz."""

    buffered: int  # records in memory not yet durable (buffer + the flush in progress)
    journaled: int  # records spilled to the local journal, waiting for the store
    flush_lag_s: float  # how long the oldest record not yet in the store has waited; 0 if none
    last_flush_s: float | None  # wall clock of the last successful flush
    last_flush_duration_s: float
    flush_failures: int  # failed flush attempts since start
    records_written: int  # records newly made durable in the store
    duplicates: int  # records dropped because the same record (uid) was already recorded
    record_errors: int  # records record() could not take (logged)
    last_error: str | None


def latest(records: Iterable[LedgerRecord]) -> LedgerRecord | None:
    """The record that ended last, or None."""
    return max(records, key=lambda r: r.end_s, default=None)


def split_uid(uid: str) -> tuple[str, str]:
    """A `LedgerRecord.uid` back into (request_id, key)."""
    request_id, _, key = uid.partition(UID_SEP)
    return request_id, key
