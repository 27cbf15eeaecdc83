"""lm-evaluation-harness through `swarmllm api`: its `local-completions` model (log-likelihoods with `echo` and
`logprobs`, generations with its stop lists) against a local swarm of 2 SmolLM2 servers, beside its `hf` model on
the same checkpoint in this process's machine, on two small tasks written here (multiple choice and
generate-until; no dataset download). Prints each run's scores, the largest difference between the two runs'
per-choice log-likelihoods, whether every greedy flag and generation is the same, and the seconds each run took.

lm-eval lives in a venv of its own (it pins its own dependencies), made once:
    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm_eval[api,hf]" transformers==5.24.0

    python benchmarks/lm_eval_compat.py [--lm-eval-venv /tmp/lmeval] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402

CHOICES = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("The largest planet in the solar system is", [" Mars", " Jupiter", " Venus"], 1),
    ("Water freezes at a temperature of", [" 100 degrees Celsius", " 0 degrees Celsius", " 50 degrees"], 1),
    ("The opposite of hot is", [" cold", " fast", " green"], 0),
    ("A baby cat is called a", [" puppy", " kitten", " calf"], 1),
    ("The sun rises in the", [" west", " north", " east"], 2),
    ("Two plus two equals", [" four", " five", " seven"], 0),
    ("The color of the sky on a clear day is", [" red", " blue", " black"], 1),
    ("Bees make", [" milk", " honey", " silk"], 1),
    ("The first month of the year is", [" January", " March", " October"], 0),
]
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is 2+2?", "4"),
    ("What color is the sky?", "Blue"),
    ("What is the opposite of hot?", "Cold"),
    ("How many legs does a spider have?", "8"),
]
TASKS = {
    "swarm_mc": """task: swarm_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/mc.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
""",
    "swarm_gen": """task: swarm_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/gen.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:", "<|im_end|>", "</s>", "<|endoftext|>", "Question:"]
  max_gen_toks: 16
  do_sample: false
metric_list: [{{metric: exact_match, ignore_case: true, ignore_punctuation: true}}]
""",
}


def write_tasks(folder: Path) -> None:
    with (folder / "mc.jsonl").open("w") as f:
        for question, choices, answer in CHOICES:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    with (folder / "gen.jsonl").open("w") as f:
        for question, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    for name, text in TASKS.items():
        (folder / f"{name}.yaml").write_text(text.format(dir=folder))


def run_lm_eval(venv: Path, folder: Path, model: str, model_args: str, out: Path) -> tuple[dict, float]:
    """lm-eval's samples per task, and the seconds the run took."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(venv / "bin" / "lm_eval"), "--model", model, "--model_args", model_args]
    command += ["--tasks", ",".join(TASKS), "--include_path", str(folder), "--batch_size", "1"]
    command += ["--log_samples", "--output_path", str(out)]
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"lm_eval failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    samples = {}
    for name in TASKS:
        (path,) = out.rglob(f"samples_{name}_*.jsonl")
        samples[name] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lm-eval-venv", type=Path, default=Path("/tmp/lmeval"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not (args.lm_eval_venv / "bin" / "lm_eval").exists():
        sys.exit(f"no lm_eval in {args.lm_eval_venv}: see this script's doc")
    from swarmllm.bundled import smollm2_checkpoint
    from swarmllm.local import LocalSwarm

    path = str(smollm2_checkpoint())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tasks(folder)
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            servers = [(path, (0, 15)), (path, (15, 30))]
            swarm.add_servers(servers, extra=["--throughput", "50", "--bandwidth", "1000"])
            url = swarm.start_api(path, extra=["--name", "smollm2"])
            # no tokenizer named: lm-eval finds the API's own (`/tokenizer_info`, `/tokenize`, `/detokenize`)
            api_args = f"model=smollm2,base_url={url}/completions"
            ours, ours_s = run_lm_eval(
                args.lm_eval_venv, folder, "local-completions", api_args, folder / "swarm"
            )
        local_args = f"pretrained={path},dtype=float32"
        theirs, theirs_s = run_lm_eval(args.lm_eval_venv, folder, "hf", local_args, folder / "local")
    pairs = list(zip(ours["swarm_mc"], theirs["swarm_mc"], strict=True))
    differences = [
        abs(float(a[0][0]) - float(b[0][0]))
        for x, y in pairs
        for a, b in zip(x["resps"], y["resps"], strict=True)
    ]
    greedy_same = all(
        a[0][1] == b[0][1] for x, y in pairs for a, b in zip(x["resps"], y["resps"], strict=True)
    )
    texts_same = [x["filtered_resps"] for x in ours["swarm_gen"]] == [
        y["filtered_resps"] for y in theirs["swarm_gen"]
    ]

    def mean(samples, metric):
        return sum(s[metric] for s in samples) / len(samples)

    rows = [
        [
            "swarm_mc (multiple choice)",
            len(pairs),
            f"{mean(ours['swarm_mc'], 'acc'):.2f}",
            f"{mean(theirs['swarm_mc'], 'acc'):.2f}",
            f"{max(differences):.1e}",
            greedy_same,
        ],
        [
            "swarm_gen (generate until)",
            len(ours["swarm_gen"]),
            f"{mean(ours['swarm_gen'], 'exact_match'):.2f}",
            f"{mean(theirs['swarm_gen'], 'exact_match'):.2f}",
            "-",
            texts_same,
        ],
    ]
    header = [
        "task",
        "docs",
        "swarm API score",
        "local hf score",
        "max log-likelihood difference",
        "same greedy flags / generations",
    ]
    table = markdown_table(header, rows)
    print(table)
    print(f"lm_eval through the swarm API: {ours_s:.0f} s; locally with hf: {theirs_s:.0f} s")
    if not args.no_record:
        notes = (
            "lm-evaluation-harness 0.4.13 (its own venv), `local-completions` against `swarmllm api` over 2 local "
            "servers of SmolLM2-135M-Instruct (token-id prompts, `echo` + `logprobs: 1` + `max_tokens: 1` for "
            "log-likelihoods, its stop lists for generations, and the API's tokenizer endpoints, which lm-eval "
            "finds by itself), beside its `hf` model on the same checkpoint "
            f"(float32). Run times: {ours_s:.0f} s through the API, {theirs_s:.0f} s locally (both including "
            "lm-eval's start-up)."
        )
        append_results(
            "lm-evaluation-harness through the OpenAI-compatible API, against local hf", table, notes
        )


if __name__ == "__main__":
    main()
