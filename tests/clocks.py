"""A clock a test sets by hand, for the pure logic that takes one (`clock=`): quotas, batching waits, head waits,
session places. Waits that run on an event loop still take real time."""


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
