"""A ladder checkpoint served by a local swarm as it is today: with server boundaries outside the ladder region,
each span settles its pending output itself and hands on r alone, so no change to the wire or the client is
needed there and greedy tokens equal the local ladder model's (cuts inside the region need (r, p) on the wire)."""

import torch
from transformers import AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.models.causal_lm import load_causal_lm
from swarmllm.models.convert import convert_to_ladder

SPANS = [(0, 2), (2, 4)]
PROMPTS = ["the cat and the dog", "a b c d e f g"]


def test_greedy_tokens_through_the_swarm_equal_the_local_ladder_model(checkpoints, tmp_path):
    path = convert_to_ladder(checkpoints("llama"), tmp_path / "llama-ladder", 2, 4)
    config = load_config(path)[1]
    assert not any(config.carries_pending(start) for start, _ in SPANS)
    local_model, standard = load_causal_lm(path), load_causal_lm(checkpoints("llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), span) for span in SPANS])
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            differs = False  # from the standard model's tokens: the servers really ran ladder layers
            for prompt in PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                want = local_model.generate_greedy(ids, 10)
                got = remote.generate(ids, max_new_tokens=10, do_sample=False)
                assert got.tolist() == want.tolist(), prompt
                differs |= not torch.equal(standard.generate_greedy(ids, 10), want)
            assert differs
            with torch.no_grad():
                torch.testing.assert_close(remote(ids).logits, local_model(ids), atol=1e-4, rtol=0)
        finally:
            remote.shutdown()
