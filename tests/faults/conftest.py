"""Fault scenarios report their figures in one table at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class FaultReport:
    rows: list[dict] = field(default_factory=list)

    def add(self, scenario: str, **figures: object) -> None:
        self.rows.append({"scenario": scenario, **figures})


_REPORT = FaultReport()


@pytest.fixture
def fault_report() -> FaultReport:
    return _REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT.rows:
        terminalreporter.section("fault scenarios")
        for row in _REPORT.rows:
            terminalreporter.write_line(str(row))
