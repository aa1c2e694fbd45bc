"""The fault scenarios' figures: each scenario registers one row; one table ends the run.

A row counts requests as a user would: sent, succeeded (a complete answer), failed with a clean
error (an OpenAI-shaped error response, or a stream ending in an SSE error event), hung (no
answer by the deadline), unclean (anything else: a cut connection, a 500, a malformed error).
`answered` are the requests whose response came from a backend (it names one in
`x-energy-backend`); those, and only those, must be in the ledger (`ledger`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import SimBackend


@dataclass
class Figures:
    """One scenario's outcome counts (requests) and its ledger check."""

    scenario: str
    sent: int = 0
    succeeded: int = 0
    clean: int = 0
    hung: int = 0
    unclean: int = 0
    answered: int = 0
    ledger: int = 0  # ledger records of this scenario's requests
    notes: list[str] = field(default_factory=list)
    verdict: str = "not run"  # the test's outcome: passed, failed, xfail (a pending proxy change), xpass

    def check(self) -> None:
        """The invariants every scenario must keep."""
        assert self.hung == 0, f"{self.scenario}: {self.hung} requests hung"
        assert self.unclean == 0, f"{self.scenario}: {self.unclean} unclean failures: {self.notes[:5]}"
        assert self.succeeded + self.clean == self.sent, self
        assert self.ledger == self.answered, f"{self.scenario}: ledger {self.ledger} != answered {self.answered}"


_ROWS: dict[str, Figures] = {}  # by test node id


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """A fresh row for this test, shown in the end-of-run table (even when the test fails)."""
    row = _ROWS[request.node.nodeid] = Figures(request.node.name.removeprefix("test_"))
    return row


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    row = _ROWS.get(item.nodeid)
    if row is not None and (report.when == "call" or report.failed):
        if hasattr(report, "wasxfail"):
            row.verdict = "xpass" if report.passed else "xfail"
        else:
            row.verdict = report.outcome
    return report


@pytest.fixture(scope="session")
def h100(session_tmp: Path) -> Iterator[SimBackend]:
    """One simulated H100 for the scenarios that do not kill their backend."""
    sim = SimBackend("h100-llama3.1-8b", session_tmp, seed=40)
    yield sim
    sim.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    head = ("scenario", "sent", "ok", "clean err", "hung", "unclean", "answered", "ledger", "test")
    rows = [(r.scenario, r.sent, r.succeeded, r.clean, r.hung, r.unclean, r.answered, r.ledger, r.verdict)
            for r in _ROWS.values()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    terminalreporter.write_sep("=", "fault scenarios (requests)")
    for line in (head, *rows):
        terminalreporter.write_line("  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                                              for i, (x, w) in enumerate(zip(line, widths, strict=True))))
    for r in _ROWS.values():  # a scenario's measured figures (RSS, latency), or its first problem
        if r.notes:
            terminalreporter.write_line(f"{r.scenario}: {r.notes[0]}")
