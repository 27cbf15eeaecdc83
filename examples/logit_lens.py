"""A logit lens through a swarm: what SmolLM2-135M-Instruct would say after each of its blocks, read from the
hidden states that the servers return for the model's layers, as Petals' `RemoteSequential` gives them.

A local swarm of 2 servers holds the 30 blocks. `model.model.layers[:k]` runs the first k of them on the servers;
the client's own final norm and LM head turn each layer's states into next-token guesses. The last layer's guess
is checked against the model's own logits, and the layers' hidden states against `output_hidden_states=True`.

    python examples/logit_lens.py [--prompt "The capital of France is"] [--every 3]
"""

import argparse

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.bundled import smollm2_checkpoint
from swarmllm.local import LocalSwarm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompt", default="The capital of France is")
parser.add_argument("--every", type=int, default=3, help="print every n-th layer")
args = parser.parse_args()
hf_logging.disable_progress_bar()

path = smollm2_checkpoint()
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]

with LocalSwarm() as swarm, torch.no_grad():
    swarm.start_bootstrap()
    swarm.add_servers([(str(path), (0, 15)), (str(path), (15, 30))])
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    layers = model.model.layers
    states = model.get_input_embeddings()(ids)
    print(f"{'layer':>5}  top next-token guesses after it (probability)")
    for k in range(len(layers)):
        states = layers[k](states)  # one block on its server; the client keeps the states between them
        if (k + 1) % args.every == 0 or k + 1 == len(layers):
            probs = model.head.logits(states[:, -1:]).softmax(-1)[0, -1]  # the final norm, then the LM head
            top = probs.topk(3)
            guesses = ", ".join(f"{tokenizer.decode(t)!r} ({p:.2f})" for p, t in zip(top.values, top.indices))
            print(f"{k + 1:>5}  {guesses}")
    every = model(ids, output_hidden_states=True)
    drift = (every.hidden_states[-2] - layers[:-1](model.get_input_embeddings()(ids))).abs().max().item()
    same = bool((model.head.logits(states)[0, -1].argmax() == every.logits[0, -1].argmax()).item())
    print(
        f"last layer's guess is the model's own: {same}; output_hidden_states' layer 29 differs by {drift:.1e}"
    )
    model.shutdown()
