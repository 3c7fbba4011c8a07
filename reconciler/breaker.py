"""Circuit breaker per target system: a pure state machine (time is passed in, nothing else is touched).

closed --(``failure_threshold`` consecutive failures)--> open --(``reset_after_s`` elapsed)--> half_open;
half_open lets one trial call through: success closes, failure re-opens for another ``reset_after_s``; a trial
that never reports back (its caller died) lapses after ``reset_after_s`` and the next call is a new trial.
An open breaker stops corrective syncs from hammering a system that is down; actions stay pending.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class Breaker:
    failure_threshold: int = 5
    reset_after_s: float = 30.0
    state: BreakerState = "closed"
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False
    trial_started: float = 0.0

    def current(self, now: float) -> BreakerState:
        """The state as seen at ``now`` (an open breaker becomes half-open once its timeout elapsed)."""
        if self.state == "open" and now - self.opened_at >= self.reset_after_s:
            return "half_open"
        return self.state

    def allow(self, now: float) -> tuple[bool, Breaker]:
        """May a call go through at ``now``? Returns the decision and the breaker after it."""
        state = self.current(now)
        if state == "closed":
            return True, self
        if state == "open":
            return False, self
        if self.trial_in_flight and self.state == "half_open" and now - self.trial_started < self.reset_after_s:
            return False, self  # a trial is out (one that never reported back lapses after reset_after_s)
        return True, replace(self, state="half_open", trial_in_flight=True, trial_started=now)

    def record_success(self, now: float) -> Breaker:
        return replace(self, state="closed", failures=0, opened_at=0.0, trial_in_flight=False)

    def record_failure(self, now: float) -> Breaker:
        if self.current(now) == "half_open" or self.state == "half_open":
            return replace(self, state="open", opened_at=now, failures=self.failures + 1, trial_in_flight=False)
        failures = self.failures + 1
        if failures >= self.failure_threshold:
            return replace(self, state="open", opened_at=now, failures=failures, trial_in_flight=False)
        return replace(self, failures=failures)

    def release(self, now: float) -> Breaker:
        """A call that ended without saying whether the system is up (it failed before or apart from the system):
        the half-open trial is over, the next call is a new trial; a closed or open breaker is unchanged."""
        return replace(self, trial_in_flight=False)

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker lets a trial call through (0 when calls may go now)."""
        if self.current(now) == "open":
            return max(0.0, self.reset_after_s - (now - self.opened_at))
        return 0.0


def as_published(snapshot: dict[str, dict[str, float | str | int]], wall_now: float) -> dict[str, dict[str, object]]:
    """A process's breakers as another process can read them: an open one by the wall-clock time it lets a trial
    through (monotonic clocks do not cross processes)."""
    return {
        system: {"state": b["state"], "failures": b["failures"], "open_until": wall_now + float(b["retry_in_s"])}
        for system, b in snapshot.items()
    }


def published_view(published: dict[str, dict[str, object]], wall_now: float) -> dict[str, dict[str, object]]:
    """What as_published said, as seen at ``wall_now``: an open breaker whose time is up is half-open."""
    view: dict[str, dict[str, object]] = {}
    for system, b in published.items():
        left = max(0.0, float(b.get("open_until", 0.0)) - wall_now)  # type: ignore[arg-type]
        state = b.get("state", "closed")
        if state == "open" and left == 0.0:
            state = "half_open"
        view[system] = {"state": state, "failures": b.get("failures", 0), "retry_in_s": round(left, 3)}
    return view
