"""A client's memory of where it sent its sessions' beginnings (`client.affinity`): which inputs it names, and
what it says a span holds."""

import torch

from swarmllm.client.affinity import PrefixMemory, entry_keys
from swarmllm.wire.prefix import BLOCK_TOKENS


def test_a_beginning_is_named_by_its_whole_blocks_where_servers_keep_it():
    x = torch.randn(1, 2 * BLOCK_TOKENS + 5, 8, generator=torch.Generator().manual_seed(0))
    keys = entry_keys(x)
    assert len(keys) == 2
    assert entry_keys(x[:, : BLOCK_TOKENS + 1]) == keys[:1]  # a block's key does not depend on what follows
    assert entry_keys(x.expand(3, -1, -1)) == keys  # a prompt repeated for beams: its rows are one
    assert entry_keys(x, torch.ones(1, x.shape[1], dtype=torch.bool)) == keys
    rows = torch.cat([x, x + 1])
    assert entry_keys(rows) == []  # rows that differ: servers keep no row of it
    padded = torch.ones(1, x.shape[1], dtype=torch.bool)
    padded[0, 0] = False
    assert entry_keys(x, padded) == []
    y = x.clone()
    y[0, BLOCK_TOKENS, 0] += 1
    assert entry_keys(y)[0] == keys[0] and entry_keys(y)[1] != keys[1]


def test_a_span_holds_the_blocks_noted_there_from_the_first_without_a_gap():
    x = torch.randn(1, 4 * BLOCK_TOKENS, 8, generator=torch.Generator().manual_seed(1))
    keys = entry_keys(x)
    memory = PrefixMemory()
    memory.note([("a", 0, 4), ("b", 4, 8)], keys[:3])
    memory.note([("c", 0, 8)], keys[:1])
    assert memory.held(keys) == {("a", 0, 4): 48, ("b", 4, 8): 48, ("c", 0, 8): 16}
    y = x.clone()
    y[0, 0, 0] += 1  # another first position: another beginning, though the later blocks' inputs agree
    assert memory.held(entry_keys(y)) == {}
    other = entry_keys(torch.randn(1, BLOCK_TOKENS, 8))
    assert memory.held(other) == {} and memory.held([]) == {}
    memory.note([("c", 0, 8)], keys)  # a longer session sent there later
    assert memory.held(keys)[("c", 0, 8)] == 64 and memory.held(keys)[("a", 0, 4)] == 48


def test_the_least_recently_noted_blocks_are_forgotten_beyond_its_capacity():
    memory = PrefixMemory(capacity=4)
    first = entry_keys(torch.randn(1, 3 * BLOCK_TOKENS, 8))
    second = entry_keys(torch.randn(1, 2 * BLOCK_TOKENS, 8))
    memory.note([("a", 0, 2)], first)
    memory.note([("a", 0, 2)], second)
    assert len(memory) == 4
    assert memory.held(first) == {}  # its first block went: the rest no longer counts
    assert memory.held(second) == {("a", 0, 2): 2 * BLOCK_TOKENS}
    memory.note([("b", 0, 2)], first[1:2])  # noted again: the most recent
    assert len(memory) == 4 and memory.held(second) == {("a", 0, 2): 2 * BLOCK_TOKENS}
