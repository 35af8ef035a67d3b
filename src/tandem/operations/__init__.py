"""One module per operation: the only place that composes storage, catalog, transport, jobs."""
