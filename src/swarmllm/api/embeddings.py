"""Text embeddings from the swarm's model, for OpenAI's `/v1/embeddings` and Ollama's `/api/embed`: an input's
final hidden state (after the model's final norm) at its last token, scaled to unit length. That is vLLM's
pooling for a causal LM served as an embedding model (`LAST`, normalised): a decoder's last position is the only
one that has read the whole input.

Inputs travel through the swarm together, right-padded (a real token keeps its position, so its state is the one
it has alone), in batches of similar lengths: sorted by length, each batch at most `BATCH_TOKENS` tokens of
padded input and `BATCH_ROWS` inputs. `dimensions` keeps a vector's first entries and scales them to unit length
again, as OpenAI and Ollama do (a model not trained for it, as most causal LMs are not, loses more by it).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import torch

from swarmllm.client.model import last_tokens

BATCH_TOKENS = 4096  # padded tokens in one pass through the swarm
BATCH_ROWS = 16


def batches(
    lengths: Sequence[int], max_tokens: int = BATCH_TOKENS, max_rows: int = BATCH_ROWS
) -> list[list[int]]:
    """The inputs' indices in batches: in order of length, each batch's rows times its longest at most
    `max_tokens` (an input longer than that goes alone) and at most `max_rows` rows."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        batch = out[-1] if out else None
        if batch is None or len(batch) == max_rows or (len(batch) + 1) * lengths[i] > max_tokens:
            out.append([i])
        else:
            batch.append(i)  # (sorted: this input is the batch's longest)
    return out


def unit(vectors: torch.Tensor, dimensions: int | None = None) -> torch.Tensor:
    """Each row (its first `dimensions` entries, when given) scaled to length 1, in float32."""
    kept = vectors.float() if dimensions is None else vectors[..., :dimensions].float()
    return torch.nn.functional.normalize(kept, dim=-1)


@torch.no_grad()
def embed(model, ids: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """[len(ids), hidden]: each input's final hidden state at its last token (not yet normalised), through the
    swarm in batches; `model` is a distributed model (its `hidden_states`)."""
    out = torch.empty(len(ids), model.config.hidden_size)
    for batch in batches([len(one) for one in ids]):
        longest = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        mask = mask.to(model.device)
        hidden = model.hidden_states(input_ids.to(model.device), mask)
        out[batch] = last_tokens(hidden, mask).float().cpu()
    return out


def encoded(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """OpenAI's `encoding_format`: a list of floats, or base64 of the float32 values, little-endian (what the
    official client asks for by default and decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
