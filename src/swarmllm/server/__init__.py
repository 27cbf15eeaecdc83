"""Serving a span of blocks: the backend (compute + KV caches), how decode steps run (eager, compiled or CUDA
graphs), the RPC handler, cache budget and the server life cycle."""
