"""How a span's positions are named by the inputs that reach it, in blocks: the keys of a server's prefix cache
(`server.prefix`), and of a client's memory of which servers it sent a beginning to (`client.affinity`).

A block's key hashes the key of the block before it with the bytes of its own inputs, so a key names the whole
beginning up to its block's end, and one key found means every block before it matched too.
"""

from __future__ import annotations

import hashlib

import torch

BLOCK_TOKENS = 16


def block_keys(parent: bytes, inputs: torch.Tensor, block: int = BLOCK_TOKENS) -> list[bytes]:
    """The keys of the whole blocks of `inputs` [T, H] (host memory), each chained on the one before."""
    rows = inputs.contiguous().view(torch.uint8).reshape(inputs.shape[0], -1)
    dtype = str(inputs.dtype).encode()
    keys = []
    for a in range(0, inputs.shape[0] - block + 1, block):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(dtype)
        digest.update(rows[a : a + block].numpy().data)
        parent = digest.digest()
        keys.append(parent)
    return keys
