#!/usr/bin/env bash
# Issue 21's GPU checks in one lease, on the lent machine (the `device` tool), with the wheels of `wheels.sh`:
#     run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=590)
#     bash benchmarks/gpu/run.sh multiclient     # only the steps named (below)
# Each step has its own time limit (GNU timeout stops its whole process group: servers, clients, p2pd), so one
# that hangs leaves time for the next. Logs and benchmarks/RESULTS.md (which the benchmarks append to) come back
# in $OUT; copy the new RESULTS sections into the repository's.
#   hotpath      the Llama-2-7B shape through 2 servers, fp16: CUDA graphs and eager decode, each with fp16 and
#                nf4 weights (the issue's nf4 >= 0.9x fp16), beside local transformers (~5 min)
#   multiclient  1, 4 and 8 concurrent clients of the same, loopback (the issue's >= 1,000 tokens/s) (~3 min)
#   smoke        the tiny model on CUDA, fp32, both decode modes: a first look when hotpath fails (~1 min)
#   multiclient-own  multiclient without the cache arena (--arena-length=0): caches and graphs per session and
#                per cohort, the A/B of the arena's graphs per batch-size bucket (~3 min)
#   multiclient-api  multiclient with the clients as concurrent requests to one `swarmllm api --device cuda`
#                (one process holding the head, as a GPU host serving many users would) (~3 min)
#   multiclient-many  1, 16, 32 and 64 concurrent requests to one `swarmllm api --device cuda`: the >= 1,000
#                tokens/s line needs more rows a step than 8 clients give (session 35: 4 a step, 232 tokens/s); the
#                servers let one peer (the API) hold 128 sessions and the whole cache, of 65,536 tokens (~4 min)
#   multiclient-nowait  multiclient with --batch-wait-ms 0: servers merge only the steps already waiting (~2 min)
#   batch-fp32   multiclient of the medium model in float32: merged steps through the row graphs give each
#                client its solo tokens where half precision's rounding does not differ between batch sizes (~1 min)
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no wheels: run benchmarks/gpu/wheels.sh here first and carry .whl"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, hivemind, bitsandbytes, swarmllm
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__,
      'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

step() {  # name, seconds, benchmark and its arguments
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local began=$SECONDS
    timeout -k 10 "$limit" python3 "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - began)) s"
    # what a stopped step left behind: servers run in sessions of their own (`swarmllm.local`), out of reach
    # of timeout's signal to the step's group, and hold GPU memory
    pkill -f 'swarmllm.cli|--worker|p2pd' 2>/dev/null
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(hotpath multiclient)
for name in "${steps[@]}"; do
    case $name in
        hotpath) step hotpath 300 benchmarks/hotpath.py --models llama7b --device cuda --dtype float16 \
            --quant none nf4 --repeats 3 --calls 200 ;;
        multiclient) step multiclient 200 benchmarks/multiclient.py --models llama7b --device cuda \
            --dtype float16 --networks loopback --clients 1 4 8 --repeats 2 ;;
        multiclient-own) step multiclient-own 200 benchmarks/multiclient.py --models llama7b --device cuda \
            --dtype float16 --networks loopback --clients 1 4 8 --repeats 2 --server-args=--arena-length=0 ;;
        multiclient-api) step multiclient-api 220 benchmarks/multiclient.py --models llama7b --device cuda \
            --dtype float16 --networks loopback --clients 1 4 8 --repeats 2 --faces api ;;
        multiclient-many) step multiclient-many 260 benchmarks/multiclient.py --models llama7b --device cuda \
            --dtype float16 --networks loopback --clients 1 16 32 64 --repeats 1 --faces api --no-petals \
            --server-args=--max-sessions-per-peer=128 --server-args=--max-cache-share-per-peer=1 \
            --server-args=--max-cache-tokens=65536 ;;
        multiclient-nowait) step multiclient-nowait 150 benchmarks/multiclient.py --models llama7b --device cuda \
            --dtype float16 --networks loopback --clients 1 4 8 --repeats 2 --batch-wait-ms 0 ;;
        batch-fp32) step batch-fp32 100 benchmarks/multiclient.py --models medium --device cuda \
            --dtype float32 --networks loopback --clients 1 4 8 --repeats 2 --no-petals ;;
        smoke) step smoke 120 benchmarks/hotpath.py --models tiny --device cuda --repeats 2 --calls 100 ;;
        *) echo "unknown step $name (hotpath, multiclient, multiclient-own, multiclient-api, multiclient-many, multiclient-nowait, batch-fp32, smoke)" ;;
    esac
done
