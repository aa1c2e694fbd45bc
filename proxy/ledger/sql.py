"""What the SQL stores (SQLite, PostgreSQL) share: rows to records and usage, cells, filters.

Both keep the same tables: `requests` (one row per record, keyed by its uid), `aggregates`
(integer sums per tenant x model x backend x hour_s), `holds`, and `subject_spend` (µJ and µg
per budget subject x hour_s: a managed key's own spend, for its budget; never usage).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from proxy.ledger.record import UID_SEP, LedgerRecord, is_subject, split_uid
from proxy.ledger.usage import UJ_PER_J, BudgetUnit, UsageRow, grams_to_ug, hour_iso, joules_to_uj

#: A `requests` row as `record_from_row` reads it (the key's slot is empty: it is in the uid).
REQUEST_COLUMNS = ("request_id, tenant, model, backend, prompt_tokens, completion_tokens, joules,"
                   " method, start_s, end_s, status, '', reasoning_tokens, joules_all_in, gco2e")
#: The aggregate cell of a bucket row, in `Bucket`'s order.
BUCKET_COLUMNS = ("tenant, model, backend, hour_s, requests, prompt_tokens, completion_tokens,"
                  " joules_uj, reasoning_tokens, joules_all_in_uj, gco2e_ug")
#: The sums `usage_rows` reads, after the group columns.
SUM_COLUMNS = ("SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(joules_uj),"
               " SUM(reasoning_tokens), SUM(joules_all_in_uj), SUM(gco2e_ug)")

Cell = tuple[str, str, str, int]

#: The column a budget of each unit sums, in `aggregates` and in `holds` alike (a hold's amount
#: is in its unit's column; the other is 0).
BUDGET_COLUMN: dict[BudgetUnit, str] = {"joules": "joules_uj", "gco2e": "gco2e_ug"}


#: A budget subject's spend per hour (`record.key_subject`), added in the transaction that
#: inserts its records; upserts take `SUBJECT_SPEND_VALUES` rows.
SUBJECT_SPEND_TABLE = """
CREATE TABLE IF NOT EXISTS subject_spend (
    subject TEXT NOT NULL, hour_s BIGINT NOT NULL,
    joules_uj BIGINT NOT NULL DEFAULT 0, gco2e_ug BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, hour_s)
);
"""


def spend_source(who: str) -> tuple[str, str]:
    """(table, column) a budget of `who` sums its spend from: a tenant's aggregates, or a
    budget subject's own rows."""
    return ("subject_spend", "subject") if is_subject(who) else ("aggregates", "tenant")


def add_to_spend(spend: dict[tuple[str, int], list[int]], rec: LedgerRecord) -> None:
    """Add `rec` to its key subject's [µJ, µg CO2e] of its hour, if it has one."""
    if rec.key_subject:
        sums = spend.setdefault((rec.key_subject, rec.hour_s), [0, 0])
        sums[0] += joules_to_uj(rec.joules)
        sums[1] += grams_to_ug(rec.gco2e)


def record_from_row(row: Sequence[Any]) -> LedgerRecord:
    """A `requests` row (REQUEST_COLUMNS) as a record; its first column holds the uid."""
    request_id, key = split_uid(row[0])
    return LedgerRecord.from_row([request_id, *row[1:11], key, *row[12:]])


def add_to_cell(cells: dict[Cell, list[int]], rec: LedgerRecord) -> None:
    """Add `rec` to its aggregate cell: requests, prompt, completion, µJ, reasoning, all-in µJ,
    µg CO2e."""
    cell = cells.setdefault((rec.tenant, rec.model, rec.backend, rec.hour_s), [0] * 7)
    cell[0] += 1
    cell[1] += rec.prompt_tokens
    cell[2] += rec.completion_tokens
    cell[3] += joules_to_uj(rec.joules)
    cell[4] += rec.reasoning_tokens
    cell[5] += joules_to_uj(rec.joules_all_in)
    cell[6] += grams_to_ug(rec.gco2e)


def usage_rows(rows: Iterable[Sequence[Any]], group_by: tuple[str, ...]) -> list[UsageRow]:
    """Rows of `SELECT <group columns>, SUM_COLUMNS` as usage rows (hour_s as ISO hour)."""
    out: list[UsageRow] = []
    n = len(group_by)
    for row in rows:
        if row[n] is None:
            continue  # no cells at all: no rows, as the other stores answer
        keys: dict[str, Any] = dict(zip(group_by, row[:n], strict=True))
        if "hour" in keys:
            keys["hour"] = hour_iso(int(keys["hour"]))
        sums = [int(v) for v in row[n:]]  # PostgreSQL's SUM(bigint) is numeric (Decimal)
        out.append(UsageRow(requests=sums[0], prompt_tokens=sums[1], completion_tokens=sums[2],
                            joules_uj=sums[3], joules=sums[3] / UJ_PER_J,
                            reasoning_tokens=sums[4], joules_all_in_uj=sums[5],
                            gco2e_ug=sums[6], **keys))
    return out


def where(tenant: str | None, since_hour_s: int | None, until_s: float | None,
          mark: str = "?") -> tuple[str, list[Any]]:
    """A WHERE clause on `aggregates` and its arguments; `mark` is the driver's placeholder."""
    clauses: list[str] = []
    args: list[Any] = []
    if tenant is not None:
        clauses.append(f"tenant = {mark}")
        args.append(tenant)
    if since_hour_s is not None:
        clauses.append(f"hour_s >= {mark}")
        args.append(since_hour_s)
    if until_s is not None:
        clauses.append(f"hour_s < {mark}")
        args.append(until_s)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def request_query(request_id: str, tenant: str | None, mark: str = "?") -> tuple[str, list[Any]]:
    """The latest `requests` row with this client-visible id: the id alone (rows without a
    key), or any `id UID_SEP key`, both on the primary key (needs a bytewise collation)."""
    sql = (f"SELECT {REQUEST_COLUMNS} FROM requests WHERE (request_id = {mark}"
           f" OR (request_id > {mark} AND request_id < {mark}))")
    args: list[Any] = [request_id, request_id + UID_SEP, request_id + chr(ord(UID_SEP) + 1)]
    if tenant is not None:
        sql += f" AND tenant = {mark}"
        args.append(tenant)
    return sql + " ORDER BY end_s DESC LIMIT 1", args
