"""The HTTP service around OmniEngine: request parsing, response formats, queueing, metrics."""
