"""Using a swarm: routing (pure), the per-model SwarmClient, inference sessions and the HF-style model."""
