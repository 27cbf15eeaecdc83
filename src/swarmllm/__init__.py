"""swarmllm: run large language models across a swarm of volunteer machines."""

from __future__ import annotations

from swarmllm.version import __version__

_MODELS = (
    "AutoDistributedModel",
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "DistributedModel",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
)
__all__ = [*_MODELS, "guided_logits", "__version__"]


def __getattr__(name: str):
    # Lazy, so `swarmllm dht` and other light commands don't pay for importing transformers.
    if name in _MODELS:
        from swarmllm.client import model

        return getattr(model, name)
    if name == "guided_logits":  # structured output for `generate()` (api/schemas.py)
        from swarmllm.api.schemas import guided_logits

        return guided_logits
    raise AttributeError(f"module 'swarmllm' has no attribute {name!r}")
