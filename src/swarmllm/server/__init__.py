"""Serving a span of blocks: the backend (compute + KV caches), RPC handler, cache budget, server life cycle."""
