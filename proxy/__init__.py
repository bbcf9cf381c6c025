"""The HTTP edge: forwarding with metering, the budget gate's responses, /costs and /metrics."""
