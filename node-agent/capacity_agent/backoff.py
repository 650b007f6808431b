"""The agent's one retry delay: exponential backoff with jitter, used by the publisher, the
lease renewer, the witness and the voter's claims watch."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Exponential backoff with jitter: attempt n waits a uniform share of [d/2, d], where
    d = min(cap, initial x factor^n). ``rng`` returns floats in [0, 1) (inject it in tests)."""

    def __init__(
        self,
        initial: float = 1.0,
        cap: float = 30.0,
        factor: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= cap or factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.rng = rng
        self.attempts = 0
        """Failures since the last reset."""

    def ceiling(self, attempt: int) -> float:
        """The largest delay of the given attempt (0-based), before jitter."""
        return min(self.cap, self.initial * self.factor ** min(attempt, 64))

    def next(self) -> float:
        """The delay before the next attempt, in [ceiling/2, ceiling]."""
        ceiling = self.ceiling(self.attempts)
        self.attempts += 1
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempts = 0
