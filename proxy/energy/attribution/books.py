"""The final booking of one backend's energy: what settled intervals' joules went to.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.energy.attribution.split import Split

__all__ = ["Books"]


@dataclass(slots=True)
class Books:
    """Joules of the settled span [first_s, until_s] (s), by where they went.

    Invariant: attributed_j + idle_j + carried_j + foreign_j == measured_j, to float rounding.
    The timeline's cumulative joules at both ends are kept here, so pruning old samples never
    changes the books.
    """

    first_s: float | None = None  # the first sample seen
    until_s: float | None = None  # everything before it is settled
    attributed_j: float = 0.0  # settled onto this replica's requests
    idle_j: float = 0.0
    carried_j: float = 0.0  # share mode's idle waiting for the next busy moment
    foreign_j: float = 0.0  # other replicas' requests' share (billed there)
    carry_since_s: float = 0.0  # share mode: where the carried idle stretch began
    first_e_j: float = 0.0
    until_e_j: float = 0.0

    @property
    def measured_j(self) -> float:
        """Joules the timeline measured over [first_s, until_s]."""
        return self.until_e_j - self.first_e_j

    def begin(self, first_s: float, e_j: float) -> None:
        """The first sample: at `first_s`, cumulative `e_j` joules."""
        self.first_s = self.until_s = self.carry_since_s = first_s
        self.first_e_j = self.until_e_j = e_j

    def book(self, split: Split, b_s: float, b_e_j: float) -> None:
        """Book one split interval ending at `b_s` (cumulative `b_e_j` joules there)."""
        self.carried_j = split.carried_j
        self.carry_since_s = split.carry_since_s
        self.idle_j += split.idle_j
        self.attributed_j += split.attributed_j
        self.foreign_j += split.foreign_j
        self.until_s, self.until_e_j = b_s, b_e_j
