"""Fine-tune a model that only the swarm holds: a LoRA adapter trained through a local swarm of 2 servers.

The demo model (`swarmllm demo`) never saw sentences like "the dog sat on the moon and ran to the sea ."; a few
dozen optimizer steps teach it the pattern. Then the adapter is saved as a PEFT folder, loaded with `peft` onto
the local transformers model, and its greedy output is checked against the swarm's.

    python examples/finetune.py [--epochs 3] [--steps 15] [--max-loss 0.9]
"""

import argparse
import logging
import random
import time

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # peft's import is noisy on CPUs

import peft  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from swarmllm import AutoDistributedModelForCausalLM  # noqa: E402
from swarmllm.demo import OBJECTS, SUBJECTS, demo_checkpoint  # noqa: E402
from swarmllm.local import LocalSwarm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--steps", type=int, default=15, help="optimizer steps per epoch")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--max-loss", type=float, default=0.9, help="the last epoch's mean loss must be below it")
parser.add_argument("--out", default="finetuned-adapter", help="where the PEFT adapter folder goes")
args = parser.parse_args()
hf_logging.disable_progress_bar()

path = demo_checkpoint()
tokenizer = AutoTokenizer.from_pretrained(path)
rng = random.Random(0)
torch.manual_seed(0)


def sentence() -> str:  # the new pattern
    return f"{rng.choice(SUBJECTS)} sat on {rng.choice(OBJECTS)} and ran to {rng.choice(OBJECTS)} ."


with LocalSwarm() as swarm:
    swarm.start_bootstrap()
    swarm.add_servers([(str(path), (0, 3)), (str(path), (3, 6))])
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    model.add_adapter(
        peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
        )
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    model.train()
    for epoch in range(args.epochs):
        losses, tokens, began = [], 0, time.perf_counter()
        bar = tqdm(range(args.steps), desc=f"epoch {epoch + 1}/{args.epochs}")
        for _ in bar:
            batch = tokenizer([sentence() for _ in range(args.batch)], return_tensors="pt", padding=True)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()  # gradients of the adapter come back from the servers
            optimizer.step()  # the new weights go to each server once, with the next request
            optimizer.zero_grad()
            losses.append(loss.item())
            tokens += int(batch.attention_mask.sum())
            bar.set_postfix(
                loss=f"{loss.item():.3f}", tokens_per_s=f"{tokens / (time.perf_counter() - began):.0f}"
            )
    final = sum(losses) / len(losses)
    print(f"last epoch's mean loss {final:.3f} (must be below {args.max_loss})")

    model.eval()
    model.save_pretrained(args.out)
    prompt = tokenizer("the dog", return_tensors="pt")
    ours = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    local = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), args.out).eval()
    theirs = local.generate(**prompt, max_new_tokens=10, do_sample=False)
    print(f"swarm:           {tokenizer.decode(ours[0])!r}")
    print(f"local with peft: {tokenizer.decode(theirs[0])!r}")
    model.shutdown()

assert final < args.max_loss, f"the loss {final:.3f} did not fall below {args.max_loss}"
assert ours.tolist() == theirs.tolist(), "the saved adapter does not reproduce the swarm's greedy output"
print(f"adapter saved to {args.out}; loaded with peft, it reproduces the swarm's greedy output")
