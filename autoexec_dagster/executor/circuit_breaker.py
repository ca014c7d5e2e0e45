"""A circuit breaker that stops a channel after a run of consecutive failures."""


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failed attempts and stays open for the batch.

    A batch is short and its remaining actions are escalated once the circuit opens, so there is
    no half-open probing: the next batch (or a person) decides when the destination is back.

    Args:
        threshold: Consecutive failures that open the circuit.
    """

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.is_open = False

    def record_success(self) -> None:
        """An attempt succeeded: the failure run is broken."""
        self.consecutive_failures = 0

    def record_failure(self, error: str) -> None:
        """An attempt failed; opens the circuit when the run reaches the threshold."""
        self.consecutive_failures += 1
        self.last_error = error
        if self.consecutive_failures >= self.threshold:
            self.is_open = True

    @property
    def reason(self) -> str:
        """Why the circuit is open, for the escalation queue."""
        return (
            f"circuit open: {self.consecutive_failures} consecutive failed attempts, "
            f"last error: {self.last_error}"
        )
