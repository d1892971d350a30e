"""The HTTP side of talking to a board: the signed client, its circuit breaker, blob transfer, submitting."""
