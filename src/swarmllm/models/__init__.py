"""Model math and checkpoint loading; imports only torch, transformers, safetensors and huggingface_hub
(and bitsandbytes, lazily, for quantized weights).

llama.py       BlockConfig, KVCache, RotaryEmbedding, LlamaBlock, BlockSpan (a server's blocks), ClientHead
               (a client's embeddings + final norm + LM head) for Llama 2/3.x, Mistral and Qwen2/2.5
ladder.py      Ladder Residual: which boundaries carry the pair (r, p), one layer's residual wiring (ladder and,
               under tensor parallelism, standard) and `Comm`, where tensor parallelism sums sub-layer outputs
tp.py          the tensor-parallel transform of a built span (Megatron-style shards) and its torch.distributed Comms
checkpoint.py  resolve a local or hub checkpoint, load a span of blocks or the client head reading only their tensors
causal_lm.py   a whole model in one process (reference outputs, greedy generation, perplexity)
convert.py     ladder conversion of a checkpoint folder, distillation, writing trained weights back
quant.py       int8 / nf4 projections through bitsandbytes (imported only when used; int8 on a CPU through
               our panel kernel, or PyTorch's int8 kernel), their memory size
panels.py      CPU projections as panels for our AVX2 matmul kernel (kernels/panel_gemm.cpp, built at first use)
packed.py      CPU projections in oneDNN's layout where that kernel cannot run; a client head's faster copy
tiny.py        tiny random checkpoints (with a tokenizer) for tests and the demo
"""

from swarmllm.models.checkpoint import (
    files_for_tensors,
    hub_commit,
    load_client_head,
    load_config,
    load_span,
    resolve_checkpoint,
    tensor_names_for_blocks,
)
from swarmllm.models.llama import (
    BlockConfig,
    BlockSpan,
    ClientHead,
    KVCache,
    LlamaBlock,
    RMSNorm,
    RotaryEmbedding,
)

__all__ = [
    "BlockConfig",
    "BlockSpan",
    "ClientHead",
    "KVCache",
    "LlamaBlock",
    "RMSNorm",
    "RotaryEmbedding",
    "files_for_tensors",
    "load_client_head",
    "hub_commit",
    "load_config",
    "load_span",
    "resolve_checkpoint",
    "tensor_names_for_blocks",
]
