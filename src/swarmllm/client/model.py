"""The user-facing models: embeddings, final norm and LM head held locally, every block served by the swarm.

`DistributedModelForCausalLM` is a `transformers` PreTrainedModel with GenerationMixin, so `generate()` brings
greedy and sampled decoding, stopping criteria, streamers and padded batches as users know them. Generation runs
with transformers' own cache off: the KV cache lives on the servers, in an `InferenceSession`; each forward call
sends only the tokens the session has not seen yet (the longest common prefix with what it holds is reused, so a
chat that resends the whole conversation costs only its new turn).

Fine-tuning (`client.remote`): `tuning_mode="ptune" | "deep_ptune"` with `pre_seq_len=N` holds trainable prompts
(positions 0..N-1, before the input; logits and loss cover the input tokens only, and `generate` prepends them
once); `add_adapter(peft.LoraConfig(...))` a trainable LoRA adapter for every block, which servers apply to this
client's requests only. The client's own weights are frozen unless the user unfreezes them. `save_pretrained`
writes a PEFT adapter folder (and the client-side trainable tensors, if any); `load_adapter` reads one back.
`active_adapter=NAME` uses an adapter the servers host instead (routing only via servers that announce it).
PEFT's own `get_peft_model` / `PeftModel.from_pretrained` inject LoRA layers into the blocks' placeholders
(`client.layers`), whose active adapter each request sends likewise.
`DistributedModelForSequenceClassification` puts a trainable classification head over the same blocks;
`DistributedModel` itself is the base model (`last_hidden_state`, as transformers' `AutoModel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    MaxTimeCriteria,
    MinPLogitsWarper,
    PretrainedConfig,
    PreTrainedModel,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.configuration_utils import GenerationMode
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutput,
)
from transformers.utils.generic import ModelOutput, can_return_tuple

from swarmllm.client.heads import MergedHead
from swarmllm.client.layers import RemoteLayers, injected_lora, refuse_wrapped_head
from swarmllm.client.loop import event_loop, run_sync
from swarmllm.client.remote import PeftLora, PromptTuning, RemoteLora, run_blocks
from swarmllm.client.session import InferenceSession
from swarmllm.client.speculative import PromptLookup, SpeculationStats, speculative_generate
from swarmllm.client.swarm import SwarmClient
from swarmllm.client.tuning import Tuning
from swarmllm.dht.info import model_fingerprint
from swarmllm.dht.records import dht_prefix_for
from swarmllm.models import BlockConfig, ClientHead, hub_commit, load_client_head, load_config
from swarmllm.models.gguf import local_gguf
from swarmllm.models.llama import FAMILIES
from swarmllm.models.lora import (
    CONFIG_FILE,
    LoraSettings,
    read_peft_adapter,
    read_peft_head,
    write_peft_adapter,
)
from swarmllm.models.packed import PackedCopy

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = FAMILIES  # the block families the servers implement
TUNING_MODES = ("ptune", "deep_ptune")
DEFAULT_DRAFT_TOKENS = 5  # k of speculative decoding when the generation config sets no num_assistant_tokens
# generation options that change the tokens (or their number) beyond temperature / top-k / top-p / min-p: not
# applied by the speculative loop, so refused there rather than ignored
_UNSPECULATIVE = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_new_tokens",
    "min_length",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "num_return_sequences",
    "stop_strings",
    "guidance_scale",
    "watermarking_config",
)
# transformers' fill-ins for what neither the call nor the model's generation config sets (top_k 50 when
# sampling) that the speculative loop takes too; max_length (new_tokens counts it) and num_assistant_tokens
# (DEFAULT_DRAFT_TOKENS) are its own
_NOT_DEFAULTED = ("max_length", "num_assistant_tokens")
# every tensor the client trains (prompts, a head, the adapter's A/B) by its state-dict name, under transformers'
# name for a model's weights: what a Trainer loads to resume from its checkpoints (it loads no adapter folder)
CLIENT_WEIGHTS_FILE = "model.safetensors"
DEFAULT_NEW_TOKENS = 20  # what transformers' generate adds when given neither max_new_tokens nor max_length


def new_tokens(
    max_new_tokens: int | None, max_length: int | None, input_length: int, max_positions: int | None
) -> int:
    """How many tokens `generate` may add, as transformers counts them: `max_new_tokens` wins over `max_length`
    (which counts the prompt); with neither, 20 (within the model's positions), since transformers' default
    `max_length` is unset and then means 20 new tokens."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is not None:
        return max_length - input_length
    if max_positions is None:
        return DEFAULT_NEW_TOKENS
    return min(DEFAULT_NEW_TOKENS, max_positions - input_length)


class RemoteSession:
    """A user's handle on an inference session, plus the tokens it holds (for prefix reuse). With prompts, the
    servers hold N more positions before the tokens: `position` counts tokens only."""

    def __init__(self, session: InferenceSession, prompt_length: int = 0):
        self.session = session
        self.prompt_length = prompt_length
        self.input_ids: torch.Tensor | None = None  # [batch, position]
        self.attention_mask: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None  # [batch, position, hidden], when sent as embeddings
        # what the latest generate in it returned (with its attention mask): what `generate(session=...)` continues
        self.output_ids: torch.Tensor | None = None
        self.output_mask: torch.Tensor | None = None
        self._copied_before = 0  # `copied` of the sessions it replaced (`for_batch`)

    @property
    def position(self) -> int:
        return max(self.session.position - self.prompt_length, 0)

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def copied(self) -> int:
        """Positions of its steps that every server copied from its prefix cache (`server.prefix`), so far."""
        return self._copied_before + self.session.copied

    @property
    def max_length(self) -> int:
        return self.session.max_length - self.prompt_length

    def for_batch(self, batch_size: int) -> InferenceSession:
        """The session to step a batch of `batch_size` rows from position 0: this one, or, when its servers hold
        rows of another batch size (a generate with beams or several sequences after one without), a new one in
        its place, of the same length, prompts, adapter and compression (nothing held is of use then)."""
        old = self.session
        if old.hops and old.batch_size != batch_size:
            run_sync(old.close())
            self._copied_before += old.copied
            self.session = InferenceSession(old.swarm, old.max_length, old.tuning, old.compression)
            self.input_ids = self.attention_mask = self.embeds = self.output_ids = self.output_mask = None
        return self.session

    def reusable_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """How many leading positions of `embeds` the servers already hold: those equal to the embeddings sent
        before (PEFT's prompt learning sends the whole sequence's, its prompts first, at every step)."""
        if self.embeds is None or self.embeds.shape[0] != embeds.shape[0]:
            return 0
        n = min(self.position, embeds.shape[1], self.embeds.shape[1])
        same = (self.embeds[:, :n] == embeds[:, :n]).all(-1) & (
            self.attention_mask[:, :n] == attention_mask[:, :n]
        )
        mismatch = (~same.all(dim=0)).nonzero()
        return int(mismatch[0]) if len(mismatch) else n

    def reusable_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[int, list[int] | None]:
        """How many leading tokens of `input_ids` the servers already hold, and the rows to reorder them by
        first (or None). Beam search asks for each beam's next token with the sequences of the beams it kept:
        row i then continues the held row reorder[i], and with one new token a row the step reorders the
        servers' rows (`InferenceSession.step`) instead of sending the diverged history again."""
        if self.input_ids is None or self.input_ids.shape[0] != input_ids.shape[0]:
            return 0, None
        n = min(self.position, input_ids.shape[1])
        held, held_mask = self.input_ids[:, :n], self.attention_mask[:, :n]
        if torch.equal(held, input_ids[:, :n]) and torch.equal(held_mask, attention_mask[:, :n]):
            return n, None  # the common case, a generate's next step: everything held is reused
        if n == self.position == input_ids.shape[1] - 1:
            # continues[i, j]: row i's tokens so far are those of held row j
            same = (input_ids[:, None, :n] == held) & (attention_mask[:, None, :n] == held_mask)
            continues = same.all(dim=-1)
            if bool(continues.any(dim=1).all()):
                return n, continues.int().argmax(dim=1).tolist()
        same = (held == input_ids[:, :n]) & (held_mask == attention_mask[:, :n])
        mismatch = (~same.all(dim=0)).nonzero()
        return (int(mismatch[0]) if len(mismatch) else n), None


# what `from_pretrained` passes on to `SwarmClient`: its options but those the model sets itself
_CLIENT_OPTIONS = frozenset(inspect.signature(SwarmClient).parameters) - {
    "initial_peers",
    "dht_prefix",
    "num_blocks",
    "active_adapter",
    "ladder_layers",
    "fingerprint",
    "commit",
    "hidden_size",
}


def _head_dtype(dtype: torch.dtype | str, name_or_path: str, hub: dict) -> torch.dtype:
    """`from_pretrained`'s dtype as transformers takes it: a torch dtype, its name ("bfloat16"), or "auto", the
    checkpoint's own (its config's; float32 where it names none)."""
    if dtype == "auto":
        hf_config, _ = load_config(name_or_path, **hub)
        dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype {dtype!r} names no torch dtype (e.g. 'bfloat16', or 'auto')")
        dtype = named
    return dtype


def _shut_down_dropped(swarm: SwarmClient) -> None:
    """A model dropped without `shutdown`: its swarm (a DHT process, connections) goes in the background (the last
    reference may go on the client loop's own thread, which must not wait for it)."""
    asyncio.run_coroutine_threadsafe(swarm.shutdown(), event_loop())


def _layer_outputs(options: dict, config: PretrainedConfig) -> bool:
    """Whether the call asks for every layer's hidden states (`output_hidden_states`; a call that does not say
    asks what the config says, as transformers' models read it): they come a block at a time (`_blocks`).
    Attentions, which the servers do not return, and a client's `past_key_values` or `cache` are refused rather
    than answered with None or ignored (generate passes them on too)."""
    asked = {}
    for option in ("output_hidden_states", "output_attentions"):
        given = options.get(option)
        asked[option] = bool(given if given is not None else getattr(config, option, False))
    if asked["output_attentions"]:
        raise NotImplementedError("output_attentions: the servers return no attention weights")
    # PEFT's prefix tuning passes its prefixes so: as `past_key_values`, or as `cache` (its name since transformers
    # 5.24, which PEFT 0.22 uses; an empty one is generate's own)
    for name in ("past_key_values", "cache"):
        given = options.get(name)
        if given is None or (
            name == "cache" and hasattr(given, "get_seq_length") and not given.get_seq_length()
        ):
            continue
        raise NotImplementedError(
            f"{name}: the KV cache lives on the servers (`inference_session`), and a client's keys and values "
            "cannot be given to them; for prompts trained through the swarm, tuning_mode='deep_ptune'"
        )
    return asked["output_hidden_states"]


class DistributedModel(PreTrainedModel):
    """What every distributed model shares: the local head, the swarm, prompts and adapters. On its own, the
    base model (`AutoDistributedModel`): the final hidden states, e.g. for embeddings."""

    config_class = PretrainedConfig
    base_model_prefix = "head"
    main_input_name = "input_ids"
    # where the blocks' placeholders are (`client.layers`): transformers' path of the decoder layers
    # (a base model's own; a causal LM's and a classifier's under `model.`), so PEFT saves its keys
    layers_path = "layers"

    def __init__(
        self, config: PretrainedConfig, head: ClientHead, swarm: SwarmClient, name_or_path: str = ""
    ):
        super().__init__(config)
        self.head = head.requires_grad_(False)  # frozen unless the user unfreezes it
        self.swarm = swarm
        self.name_or_path = name_or_path
        self.block_config = BlockConfig.from_hf(config)
        self.ptune: PromptTuning | None = None
        self.lora: RemoteLora | None = None
        parent, _, name = self.layers_path.rpartition(".")
        if parent:
            self.add_module(parent, torch.nn.Module())
        self.get_submodule(parent).add_module(name, RemoteLayers.build(self.block_config, self))
        self._injected: dict[str, PeftLora] = {}  # PEFT's adapters by name, as last sent
        self._base: DistributedModel | None = None  # (`with_adapter`'s: the model whose swarm it uses)
        self._sessions = threading.local()  # each thread its own active session: concurrent generates
        # the head's matmul without gradients on a CPU (models/packed.py), and a greedy step's (models/screen.py)
        self.head_copy = copied = PackedCopy()
        self.merged_head = MergedHead(  # one a step for all
            lambda hidden: self.head.logits(hidden, copied),
            lambda hidden: self.head.logits(hidden, copied.argmax_logits),
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        initial_peers: Sequence[str],
        dht_prefix: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        gguf_file: str | None = None,
        **options,
    ):
        """Load the local parts of a model (hub id or local folder) and join the swarm serving its blocks.

        ``dtype`` is the head's, as transformers takes it: a torch dtype, its name, or "auto" (the checkpoint's;
        ``torch_dtype``, its former name, too). ``revision``, ``cache_dir`` and ``token`` go to the hub, as in
        transformers, and ``gguf_file`` names a GGUF file in the folder or hub repo (as in transformers; the name
        may also be the file's path, or ``owner/repo/file.gguf``). ``swarm_key=FILE`` joins a private swarm (the
        file its servers were started with ``--swarm-key``); ``tuning_mode`` ("ptune" or "deep_ptune") with
        ``pre_seq_len`` adds trainable prompts; ``active_adapter`` uses a LoRA adapter the servers host
        (``swarmllm serve --adapters``). The other options go to `SwarmClient` (and ``num_labels`` to a
        classification model); any other is refused by name (transformers' options for loading local blocks,
        such as ``low_cpu_mem_usage``, have nothing to do here)."""
        if "torch_dtype" in options:  # transformers' former name, which it still takes
            dtype = options.pop("torch_dtype")
        unknown = sorted(set(options) - _CLIENT_OPTIONS - {"num_labels"})
        if unknown:
            raise TypeError(
                f"from_pretrained takes no option {', '.join(map(repr, unknown))}: besides initial_peers, "
                "dht_prefix, dtype, device, tuning_mode, pre_seq_len, active_adapter, revision, cache_dir, token "
                f"and gguf_file, it takes SwarmClient's {', '.join(sorted(_CLIENT_OPTIONS))}"
            )
        hub = dict(revision=revision, cache_dir=cache_dir, token=token)
        if gguf_file is not None:
            name_or_path = f"{str(name_or_path).rstrip('/')}/{gguf_file}"
        if (gguf := local_gguf(name_or_path, **hub)) is not None:
            # (a hub one fetched: a local file from here on, named as the servers' is)
            name_or_path = str(gguf)
        commit = hub_commit(name_or_path, **hub)
        hub["revision"] = commit or revision  # every file read at the one commit the swarm is told of
        hf_config, head = load_client_head(
            name_or_path, dtype=_head_dtype(dtype, name_or_path, hub), device=device, **hub
        )
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {hf_config.model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})"
            )
        if tuning_mode not in (None, *TUNING_MODES):
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES} or None, got {tuning_mode!r}")
        if "num_labels" in options:
            hf_config.num_labels = options.pop("num_labels")
        block_config = BlockConfig.from_hf(hf_config)
        swarm = SwarmClient(
            initial_peers,
            dht_prefix or dht_prefix_for(name_or_path),
            hf_config.num_hidden_layers,
            active_adapter=active_adapter,
            ladder_layers=block_config.ladder_layers,
            fingerprint=model_fingerprint(block_config),
            commit=commit,
            hidden_size=hf_config.hidden_size,
            **options,
        )
        run_sync(swarm.start())
        model = cls(hf_config, head, swarm, str(name_or_path))
        # the swarm is this model's own: dropped without `shutdown` (as transformers' models are), it leaves with it
        model._drop_swarm = weakref.finalize(model, _shut_down_dropped, swarm)
        model._drop_swarm.atexit = False  # at exit the client loop cancels what runs (`client.loop`)
        if tuning_mode is not None:
            std = getattr(hf_config, "initializer_range", 0.02)
            model.ptune = PromptTuning(model.block_config, pre_seq_len, tuning_mode == "deep_ptune", std)
            model.ptune.to(device)
        if isinstance(model, GenerationMixin):
            with contextlib.suppress(OSError, ValueError):
                model.generation_config = model.generation_config.from_pretrained(name_or_path, **hub)
            model.generation_config.use_cache = False  # the cache is on the servers
        return model.eval()

    @property
    def _active(self) -> RemoteSession | None:
        """The inference session of the calling thread (threads that generate at once each have their own)."""
        return getattr(self._sessions, "active", None)

    @_active.setter
    def _active(self, session: RemoteSession | None) -> None:
        self._sessions.active = session

    @property
    def last_speculation(self) -> SpeculationStats | None:
        """What the calling thread's latest `generate(assistant_model=...)` did (drafts made and accepted)."""
        return getattr(self._sessions, "speculation", None)

    @property
    def prompt_length(self) -> int:
        return 0 if self.ptune is None else self.ptune.length

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """Nothing to do, and accepted (a Trainer's `activation_checkpointing=True` calls it): the client keeps no
        block's activations, only each hop's input, and servers recompute their span's forward at the backward."""

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """A trainable LoRA adapter for every remote block (a `peft.LoraConfig`): its A/B matrices live here,
        and the servers apply them to this client's requests only."""
        if self.lora is not None:
            raise ValueError("this model already has an adapter")
        if self.swarm.active_adapter is not None:
            raise ValueError(f"this model uses the hosted adapter {self.swarm.active_adapter!r}")
        settings = LoraSettings.from_peft(adapter_config)
        init = (
            adapter_config.get("init_lora_weights", True)
            if isinstance(adapter_config, dict)
            else getattr(adapter_config, "init_lora_weights", True)
        )
        if init is not True:  # a new adapter starts as PEFT's default one only (A Kaiming-uniform, B zero)
            raise ValueError(f"LoRA option init_lora_weights={init!r} is not supported")
        self.lora = RemoteLora(self.block_config, settings, adapter_name)

    def _saved(self) -> dict[str, torch.Tensor]:
        """What `save_pretrained` writes to `model.safetensors`, by state-dict name: every tensor the client
        trains (a classifier's head frozen too: it is random until trained, and the logits need it)."""
        return {
            n: p.detach().contiguous()
            for n, p in self.named_parameters()
            if p.requires_grad or n == "score.weight"
        }

    @property
    def _keys_to_ignore_on_save(self) -> list[str]:
        """The state-dict entries `save_pretrained` leaves out (the checkpoint's embeddings, norm and head): a
        Trainer resuming from one of its checkpoints misses exactly these, and says nothing (it warned of them)."""
        saved = self._saved()
        return [name for name in self.state_dict() if name not in saved]

    def save_pretrained(self, save_directory: str | Path, **_) -> None:
        """A standard PEFT adapter folder for the LoRA adapter (what `peft.PeftModel.from_pretrained` loads onto
        the local transformers model), and every tensor the client trains in `model.safetensors` (what
        transformers' Trainer resumes from)."""
        path = Path(save_directory)
        own = self._saved()
        if self.lora is None and not own:
            raise ValueError("nothing to save: the model has no adapter and no trainable parameters")
        path.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            write_peft_adapter(
                path,
                self.lora.settings,
                self.lora.tensors(),
                self.name_or_path,
                score=own.get("score.weight"),  # as PEFT saves a SEQ_CLS adapter (modules_to_save)
                base_model_only=type(self) is DistributedModel,  # transformers' AutoModel: no LM head
            )
        if own:
            save_file(own, path / CLIENT_WEIGHTS_FILE)

    def with_adapter(self, path: str | Path, adapter_name: str | None = None) -> DistributedModel:
        """Another model over this one's swarm connection and head, with the adapter `save_pretrained` wrote
        at `path`: one client serving several fine-tunes at once (`swarmllm api --lora-modules`), without another
        DHT peer or copy of the embeddings and LM head. The swarm stays this model's: the new one's `shutdown`
        leaves it. A server holds at most 4 adapters of one client at a time."""
        model = type(self)(self.config, self.head, self.swarm, self.name_or_path)
        model._base, model.head_copy, model.merged_head = self, self.head_copy, self.merged_head
        if isinstance(model, GenerationMixin):
            model.generation_config = copy.deepcopy(self.generation_config)
        model.load_adapter(path, adapter_name)
        return model.eval()

    def load_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Load what `save_pretrained` wrote (a PEFT LoRA folder, and the client's other tensors if present)."""
        path = Path(path)
        lora, own = None, {}
        if (path / CONFIG_FILE).exists():
            lora = read_peft_adapter(path, self.block_config)
            if (head := read_peft_head(path)) is not None:
                own["score.weight"] = head
        if (path / CLIENT_WEIGHTS_FILE).exists():  # the adapter's tensors come from PEFT's folder
            own.update(
                {n: t for n, t in load_file(path / CLIENT_WEIGHTS_FILE).items() if not n.startswith("lora.")}
            )
        if lora is None and not own:
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} or {CLIENT_WEIGHTS_FILE} to load")
        params = dict(self.named_parameters())
        for name, tensor in own.items():  # all checked before anything changes
            if name not in params:
                raise ValueError(f"{path}: {name} does not fit this model (it has no such tensor)")
            if params[name].shape != tensor.shape:
                resize = (  # saved after `resize_token_embeddings`: the vocabulary's rows differ
                    f": resize_token_embeddings({tensor.shape[0]}) first, as before the training"
                    if name.startswith("head.") and params[name].shape[1:] == tensor.shape[1:]
                    else ""
                )
                raise ValueError(
                    f"{path}: {name} does not fit this model (saved {tuple(tensor.shape)}, this model's "
                    f"{tuple(params[name].shape)}){resize}"
                )
        if lora is not None:
            settings, tensors = lora
            if self.lora is None or self.lora.settings != settings:
                self.lora = None
                self.add_adapter(settings.to_peft_dict(), adapter_name)
            self.lora.load_tensors(tensors)
        with torch.no_grad():
            for name, tensor in own.items():
                params[name].copy_(tensor)

    def _blocks(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, every_layer: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The input's hidden states after every block (prompts prepended, and cut off again), and with
        `every_layer` transformers' `hidden_states` (the input, then the states after each block, the last through
        the final norm), one request a block: the servers return only their last block's states."""
        mask = None if attention_mask is None else attention_mask.bool()
        if self.ptune is not None:
            embeds = self.ptune.prepend(embeds)
            if mask is not None:
                mask = torch.cat([mask.new_ones(mask.shape[0], self.prompt_length), mask], dim=1)
        n = self.prompt_length
        if not every_layer:
            return self.run_layers(embeds, mask)[:, n:], None
        blocks = self.block_config.num_layers
        try:  # every block's range first, so that a model that has no such states is refused before any request
            for block in range(blocks):
                self.swarm.block_range((block, block + 1))
        except ValueError as e:
            raise NotImplementedError(f"output_hidden_states: {e}") from None
        states = [embeds]
        for block in range(blocks):
            states.append(self.run_layers(states[-1], mask, (block, block + 1)))
        states = [state[:, n:] for state in states]
        return states[-1], (*states[:-1], self.head.norm(states[-1]))

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T, H]: the final norm's output at every position of the input, through every block (no
        session): transformers' `last_hidden_state`."""
        return self._final_states(input_ids, attention_mask, inputs_embeds)[0]

    def _final_states(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        every_layer: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`hidden_states`, and with `every_layer` transformers' `hidden_states` too (see `_blocks`)."""
        embeds = self.head.embed(input_ids) if inputs_embeds is None else inputs_embeds
        hidden, every = self._blocks(embeds, attention_mask, every_layer)
        return self.head.norm(hidden) if every is None else every[-1], every

    @can_return_tuple  # return_dict=False (or the config's) gives a tuple, as transformers' models do
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **options: object,
    ) -> BaseModelOutputWithPast:
        """The base model's output, as transformers' `AutoModel` gives it: `last_hidden_state` (and with
        `output_hidden_states`, every layer's)."""
        every_layer = _layer_outputs(options, self.config)
        hidden, every = self._final_states(input_ids, attention_mask, inputs_embeds, every_layer)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=every)

    def run_layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        blocks: tuple[int, int] | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states through blocks [start, end) (all by default) with the model's adapter and deep prompts
        (or `prompts`, [all blocks, B or 1, P, H], instead): what the model's layers do when called
        (`client.layers`)."""
        mask = None if attention_mask is None else attention_mask.bool()
        key_mask = None if mask is None or bool(mask.all()) else mask
        lora = self._adapter()
        return run_blocks(self.swarm, hidden, key_mask, self.ptune, lora, self.training, blocks, prompts)

    def open_layers_session(
        self, max_length: int, compression: str | None, blocks: tuple[int, int]
    ) -> InferenceSession:
        """A session through blocks [start, end) (the layers' `inference_session`)."""
        return InferenceSession(self.swarm, max_length, self._session_tuning(), compression, blocks)

    def _adapter(self) -> RemoteLora | PeftLora | None:
        """The client's adapter for a request: `add_adapter`'s, or the one PEFT injected and has active."""
        refuse_wrapped_head(self.head)
        injected = injected_lora(self.get_submodule(self.layers_path), self.block_config)
        if injected is None:
            return self.lora
        if self.lora is not None or self.swarm.active_adapter is not None:
            raise ValueError("PEFT's adapter and another one (add_adapter's, or a hosted one): one at a time")
        name, settings, tensors = injected
        lora = self._injected.get(name)
        if lora is None or not lora.holds(settings, tensors):
            lora = self._injected[name] = PeftLora(settings, tensors)
        return lora

    def _session_tuning(self) -> Tuning:
        deep = None if self.ptune is None or self.ptune.deep is None else self.ptune.deep.detach()[:, None]
        lora = self._adapter()
        weights = None if lora is None else lora.snapshot()
        return Tuning(deep, self.swarm.active_adapter, weights)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, compression: str | None = None) -> Iterator[RemoteSession]:
        """Keep server caches across calls: every `generate` / forward inside reuses this session (it belongs to
        the calling thread: several threads may each hold one on the same model and generate at once). The
        prompts and adapter are those of when it opens. `compression` ("float16", "bfloat16", "blockwise8";
        default: the client's `compression` option, "none" unless set) is how its hidden states travel
        (`wire.compression`)."""
        remote = self.open_session(max_length, compression)
        try:
            with self.use_session(remote):
                yield remote
        finally:
            self.close_session(remote)

    def open_session(self, max_length: int, compression: str | None = None) -> RemoteSession:
        """An inference session that outlives a `with` block (see `inference_session`): `use_session` makes it
        the calling thread's for a while, any thread's in turn, and `close_session` ends it. What keeps
        sessions between requests (`swarmllm api`) uses this. Between uses, a session of this client waiting
        for room on one of its servers may have it give up its hops there (`client.room`): its next use
        rebuilds them from its kept inputs."""
        n = self.prompt_length
        return RemoteSession(
            InferenceSession(self.swarm, max_length + n, self._session_tuning(), compression), n
        )

    @contextlib.contextmanager
    def use_session(self, remote: RemoteSession) -> Iterator[RemoteSession]:
        """Make `remote` the calling thread's session inside the block (every `generate` / forward reuses what
        it holds), without closing it after."""
        if self._active is not None:
            raise RuntimeError("an inference session is already active on this model")
        self._active = remote
        remote.session.parked = False
        try:
            yield remote
        finally:
            self._active = None
            remote.session.parked = True  # (`for_batch` may have put another session in its place meanwhile)

    def close_session(self, remote: RemoteSession) -> None:
        run_sync(remote.session.close())

    def shutdown(self) -> None:
        if self._base is not None:  # the swarm is the base model's
            return
        if (drop := getattr(self, "_drop_swarm", None)) is not None:
            drop.detach()
        run_sync(self.swarm.shutdown())


class DistributedModelForCausalLM(DistributedModel, GenerationMixin):
    layers_path = "model.layers"
    # transformers' `tie_weights` (which `resize_token_embeddings` calls) ties them where the config says so
    _tied_weights_keys = {"head.lm_head.weight": "head.embed_tokens.weight"}

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        """The vocabulary is the client's alone (`resize_token_embeddings`): servers see only hidden states."""
        self.head.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.head.lm_head = value

    @torch.no_grad()
    def generate(
        self, inputs: torch.Tensor | None = None, *args, session: RemoteSession | None = None, **kwargs
    ):
        """transformers' `generate` over the swarm (inside an `inference_session`, given the whole sequence: the
        servers are sent what they do not hold); with `session=S`, or with no input inside a session, Petals'
        way (`_continue`): the input continues what the session's latest generate returned. With
        `assistant_model=DRAFT` (a local causal LM with the same vocabulary), speculative decoding
        (`client.speculative`): greedy or sampled (temperature, top_k, top_p, min_p), `num_assistant_tokens`
        drafts per round ("heuristic" `num_assistant_tokens_schedule` adapts it);
        with `prompt_lookup_num_tokens=K` instead, the same with drafts copied from the sequence, K at first
        and then adapted unless the schedule is "constant" (`max_matching_ngram_size` its longest n-gram match,
        2 by default), no draft model;
        batch size 1, with a `streamer`, `stopping_criteria` (asked after each round) and a `logits_processor`
        list (applied to both models at each prefix, in any order: each must depend on the prefix alone), and
        `record_logits`, a function given the model's own logits [n, vocab] at each round's n new tokens before
        the streamer gets them (for their log-probabilities). `self.last_speculation` then says how many drafts
        were accepted."""
        given = (
            inputs is not None
            or kwargs.get("input_ids") is not None
            or kwargs.get("inputs_embeds") is not None
        )
        if session is not None or (
            self._active is not None and not given and self._active.output_ids is not None
        ):
            return self._continue(session or self._active, inputs, args, kwargs)
        # transformers drops an attention mask of all ones, and then sends the tokens after `inputs_embeds` alone:
        # only this says that they continue what the session holds (`_session_forward`)
        self._sessions.after_embeds = kwargs.get("inputs_embeds") is not None
        try:
            result = self._generate(inputs, *args, **kwargs)
        finally:
            self._sessions.after_embeds = self._sessions.argmax_only = False
            self.merged_head.forget()
        active = self._active
        if active is not None and kwargs.get("inputs_embeds") is None:
            sequences = result.sequences if isinstance(result, ModelOutput) else result
            mask = kwargs.get("attention_mask")
            if mask is not None:
                mask = torch.cat(
                    [mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], dim=1
                )
            active.output_ids, active.output_mask = sequences, mask
        return result

    def _continue(self, remote: RemoteSession, inputs: torch.Tensor | None, args: tuple, kwargs: dict):
        """Petals' way of generating in a session (`generate(ids, session=s)`, then `generate(None, session=s)`
        for more): the input, or none, continues the sequences the session's latest generate returned, and the
        result holds only the input and the new tokens. The whole sequence goes to `generate`, which sends the
        servers only what they do not hold."""
        if kwargs.get("inputs_embeds") is not None:
            raise NotImplementedError(
                "generate(session=...) continues a session with input_ids, not inputs_embeds"
            )
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        held, held_mask = remote.output_ids, remote.output_mask
        before = 0 if held is None else held.shape[1]
        if held is not None:
            if inputs is not None and inputs.shape[0] != held.shape[0]:
                raise ValueError(
                    f"{inputs.shape[0]} sequences cannot continue the session's {held.shape[0]} (generate(session="
                    "...) continues what the session's latest generate returned)"
                )
            inputs = held if inputs is None else torch.cat([held, inputs.to(held.device)], dim=1)
            mask = kwargs.get("attention_mask")
            if (mask is not None or held_mask is not None) and (
                mask is None or mask.shape[1] < inputs.shape[1]
            ):
                # the new part's mask (or none: all ones) after the held part's (a mask of the whole is kept)
                if held_mask is None:
                    held_mask = torch.ones_like(held)
                if mask is None:
                    mask = held_mask.new_ones(inputs.shape[0], inputs.shape[1] - before)
                kwargs["attention_mask"] = torch.cat([held_mask, mask.to(held_mask)], dim=1)
        context = contextlib.nullcontext() if self._active is remote else self.use_session(remote)
        with context:
            result = self.generate(inputs, *args, **kwargs)
        if isinstance(result, ModelOutput):
            result.sequences = result.sequences[:, before:]
            return result
        return result[:, before:]

    def _get_logits_processor(
        self, generation_config: GenerationConfig, *args, **kwargs
    ) -> LogitsProcessorList:
        """transformers' processors for this generate; with none, a greedy generate that returns no scores takes
        each step's argmax and nothing else: its steps' logits are then screened (`models.screen`), -inf where
        a row's largest cannot be."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        self._sessions.argmax_only = (
            not processors
            and generation_config.get_generation_mode() == GenerationMode.GREEDY_SEARCH
            and not generation_config.output_scores
            and not generation_config.output_logits
        )
        return processors

    def _generate(self, inputs: torch.Tensor | None, *args, **kwargs):
        """`generate`'s work, while the calling thread takes part in the merged LM head."""
        config = self._given_generation_config(kwargs.get("generation_config"))
        lookup = kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens)
        if kwargs.get("assistant_model") is not None or lookup:
            if args:
                raise TypeError(
                    "with assistant_model or prompt_lookup_num_tokens, pass generation options by keyword"
                )
            return self._speculative_generate(inputs, **kwargs)
        kwargs["use_cache"] = False
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and (kwargs.get("num_beams", config.num_beams) or 1) > 1:
            # transformers then sends each step's new tokens alone, without the beams they continue
            raise NotImplementedError("beam search from inputs_embeds is not supported: pass input_ids")
        if self._active is not None:
            return super().generate(inputs, *args, **kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        prompt = embeds if embeds is not None else prompt
        if prompt is None:
            raise ValueError("generate needs input_ids or inputs_embeds")
        max_new = new_tokens(
            kwargs.get("max_new_tokens", config.max_new_tokens),
            kwargs.get("max_length", config.max_length),
            prompt.shape[1],
            getattr(self.config, "max_position_embeddings", None),
        )
        with self.inference_session(max_length=prompt.shape[1] + max_new + self._peft_virtual_tokens()):
            return super().generate(inputs, *args, **kwargs)

    def _peft_virtual_tokens(self) -> int:
        """How many prompt vectors PEFT's prompt learning (prompt tuning, P-tuning) puts before the input at
        generate: its model replaces this one's `prepare_inputs_for_generation` with its own for the call."""
        prepare = self.__dict__.get("prepare_inputs_for_generation")
        config = getattr(getattr(prepare, "__self__", None), "active_peft_config", None)
        return config.num_virtual_tokens if getattr(config, "is_prompt_learning", False) else 0

    def _given_generation_config(self, given: GenerationConfig | None) -> GenerationConfig:
        """A copy of the generation config a `generate` call runs with before its keyword options: the one it
        was given, what that leaves unset filled from the model's own (its EOS, max_new_tokens, ...), as
        transformers' generate completes it; or the model's."""
        config = copy.deepcopy(self.generation_config if given is None else given)
        if given is not None:
            config.update(**self.generation_config.to_dict(), defaults_only=True)
        return config

    def _speculative_generate(self, inputs: torch.Tensor | None, **kwargs) -> torch.Tensor:
        draft = kwargs.pop("assistant_model", None)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):
            raise ValueError("speculative decoding takes one unpadded sequence")
        generator = kwargs.pop("generator", None)
        streamer = kwargs.pop("streamer", None)
        record_logits = kwargs.pop("record_logits", None)
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])  # a plain list too
        shaping = kwargs.pop("logits_processor", None) or []
        config = self._given_generation_config(kwargs.pop("generation_config", None))
        unused = config.update(**kwargs)
        unused.pop("use_cache", None)
        if unused:
            raise ValueError(f"unknown generation options {sorted(unused)}")
        defaults = config._get_default_generation_params()  # what transformers' generate fills in
        config.update(**{k: v for k, v in defaults.items() if k not in _NOT_DEFAULTED}, defaults_only=True)
        refused = [
            name
            for name in _UNSPECULATIVE
            if getattr(config, name, None) not in (None, 0, defaults.get(name))
        ]
        if refused or (config.num_beams or 1) > 1 or config.return_dict_in_generate:
            raise NotImplementedError(
                f"speculative decoding supports greedy and sampling (temperature, top_k, top_p), not {refused}"
                " / beams / return_dict_in_generate"
            )
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if self.ptune is not None:
            raise NotImplementedError("speculative decoding with trainable prompts is not supported")
        if draft is not None and config.prompt_lookup_num_tokens:
            raise ValueError("pass assistant_model or prompt_lookup_num_tokens, not both")
        if draft is None:  # prompt lookup: drafts copied from the sequence itself
            draft, k = PromptLookup(config.max_matching_ngram_size or 2), config.prompt_lookup_num_tokens
            # by default, k adapts: a rejected draft costs the servers its compute (where nothing is copied, a
            # reply's speed on the CPU fell 15% with k constant, 0-6% once it adapts: benchmarks/prompt_lookup.py)
            default_schedule = "heuristic"
        elif draft.config.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the model's "
                f"({self.config.vocab_size})"
            )
        else:
            k, default_schedule = config.num_assistant_tokens or DEFAULT_DRAFT_TOKENS, "constant"
        max_new = new_tokens(
            config.max_new_tokens,
            config.max_length,
            input_ids.shape[1],
            getattr(self.config, "max_position_embeddings", None),
        )
        processors = LogitsProcessorList(shaping)  # the caller's first, then sampling's (transformers' order)
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                processors.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(config.top_p))
            if config.min_p:
                processors.append(MinPLogitsWarper(config.min_p))
        eos = config.eos_token_id
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        pad = config.pad_token_id
        if mask is None and pad is not None and pad not in eos and bool((input_ids == pad).any()):
            # transformers infers the attention mask from them (`_prepare_attention_mask_for_generation`)
            raise ValueError(
                f"speculative decoding takes one unpadded sequence: the prompt holds the pad token {pad}"
            )
        # greedy with nothing that reads the logits but the argmax: the verify steps' head is screened too
        argmax_only = not config.do_sample and not processors and record_logits is None
        self._sessions.speculation = stats = SpeculationStats()
        opened = self._active is None
        with (
            self.inference_session(input_ids.shape[1] + max_new)
            if opened
            else contextlib.nullcontext(self._active) as remote
        ):
            start = remote.reusable_prefix(input_ids, torch.ones_like(input_ids, dtype=torch.bool))[0]
            held = input_ids[:, : min(start, input_ids.shape[1] - 1)]  # what the servers hold of the prompt

            def verify(tokens: torch.Tensor, position: int) -> torch.Tensor:
                nonlocal held
                session = remote.session if position else remote.for_batch(tokens.shape[0])
                hidden = run_sync(session.step(self.head.embed(tokens), position=position))
                held = torch.cat([held[:, :position], tokens], dim=1)
                # what the servers hold, so that a later call in this session reuses it (this one may stop
                # before its end: a streamer or a criterion that raises)
                remote.input_ids, remote.attention_mask = held, torch.ones_like(held, dtype=torch.bool)
                weight = self.head.lm_head.weight
                return self.merged_head(hidden.to(weight.device, weight.dtype), argmax_only=argmax_only)

            out = speculative_generate(
                verify,
                draft,
                input_ids,
                max_new_tokens=max_new,
                num_draft_tokens=k,
                adaptive=(config.num_assistant_tokens_schedule or default_schedule) == "heuristic",
                do_sample=bool(config.do_sample),
                processors=processors,
                eos_token_ids=eos,
                generator=generator,
                stats=stats,
                held=held.shape[1],
                streamer=streamer,
                stop=None if not criteria else lambda ids: bool(criteria(ids, None).all()),
                record=record_logits,
            )
        return out

    @can_return_tuple  # return_dict=False (or the config's) gives a tuple, as transformers' models do
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **options: object,
    ) -> CausalLMOutputWithPast:
        """Logits of the tokens sent: all of them without a session; inside one, only those it had not seen; of
        those, the last `logits_to_keep` (0: all) or the positions it lists, as in transformers (whose generate
        keeps 1: a prompt's other positions cost a client the LM head's read for nothing). Differentiable in
        whatever requires grad (prompts, the adapter, unfrozen local weights). The loss is transformers' own: a
        Trainer accumulating gradients passes `num_items_in_batch` and then leaves the loss unscaled, so it must
        divide the sum by it."""
        every_layer, every = _layer_outputs(options, self.config), None
        if self._active is not None and (input_ids is not None or inputs_embeds is not None):
            if every_layer:
                raise NotImplementedError(
                    "output_hidden_states in an inference session (as generate steps one): a session's servers "
                    "return their last block's states only; a forward outside one returns every layer's"
                )
            hidden = self._session_forward(input_ids, attention_mask, inputs_embeds)
        else:
            embeds = self.head.embed(input_ids) if inputs_embeds is None else inputs_embeds
            hidden, every = self._blocks(embeds, attention_mask, every_layer)
        weight = self.head.lm_head.weight
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        argmax_only = getattr(self._sessions, "argmax_only", False)
        logits = self.merged_head(hidden[:, kept].to(weight.device, weight.dtype), argmax_only=argmax_only)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=every)

    def _session_forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steps the active session. `inputs_embeds` are of tokens unknown: they reuse only what embeddings equal
        to theirs left, and no tokens later match them. `input_ids` shorter than `attention_mask` are the
        sequence's last tokens, the session holding those before them (transformers' generate from inputs_embeds
        sends each new token alone)."""
        active, n = self._active, self.prompt_length
        if inputs_embeds is not None:
            input_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        elif attention_mask is not None and attention_mask.shape[1] > input_ids.shape[1]:
            before = attention_mask.shape[1] - input_ids.shape[1]
            held = active.input_ids
            if held is None or held.shape[0] != input_ids.shape[0] or active.position < before:
                raise ValueError(
                    f"input_ids of {input_ids.shape[1]} tokens with an attention_mask of {attention_mask.shape[1]}:"
                    f" the session does not hold the {before} tokens before them"
                )
            input_ids = torch.cat([held[:, :before], input_ids], dim=1)
        elif attention_mask is None and getattr(self._sessions, "after_embeds", False):
            # each step adds one token: the sequence's last ones, after those held (the embeddings as unknown ones)
            held, before = active.input_ids, active.position + 1 - input_ids.shape[1]
            if held is not None and held.shape[0] == input_ids.shape[0] and before > 0:
                input_ids = torch.cat([held[:, :before], input_ids], dim=1)
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        if inputs_embeds is not None:
            start, reorder = active.reusable_embeds(inputs_embeds, mask), None
        else:
            start, reorder = active.reusable_prefix(input_ids, mask)
        start = min(start, input_ids.shape[1] - 1)
        new_mask = mask[:, start:]
        hidden = self.head.embed(input_ids[:, start:]) if inputs_embeds is None else inputs_embeds[:, start:]
        if n and start == 0:  # the prompts go first, once
            hidden = self.ptune.prepend(hidden)
            new_mask = torch.cat([new_mask.new_ones(new_mask.shape[0], n), new_mask], dim=1)
        padded = not bool(mask.all())
        position = start + n if start else 0
        session = active.session if start else active.for_batch(hidden.shape[0])
        step = session.step(hidden, new_mask if padded else None, position=position, reorder=reorder)
        out = run_sync(step)
        active.input_ids, active.attention_mask = input_ids, mask
        active.embeds = None if inputs_embeds is None else inputs_embeds.detach().clone()
        return out[:, n:] if n and start == 0 else out


def last_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, H]: each row's state at its rightmost real token (left or right padding alike)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.bool() * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class DistributedModelForSequenceClassification(DistributedModel):
    """Classification over the swarm's blocks: the final norm's output at each sequence's last real token,
    through a linear `score` head held (and trained) by the client."""

    layers_path = "model.layers"

    def __init__(
        self, config: PretrainedConfig, head: ClientHead, swarm: SwarmClient, name_or_path: str = ""
    ):
        super().__init__(config, head, swarm, name_or_path)
        self.num_labels = config.num_labels
        self.score = torch.nn.Linear(config.hidden_size, config.num_labels, bias=False)
        torch.nn.init.normal_(self.score.weight, std=getattr(config, "initializer_range", 0.02))
        self.score.to(head.lm_head.weight.device)

    @can_return_tuple  # return_dict=False (or the config's) gives a tuple, as transformers' models do
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **options: object,
    ) -> SequenceClassifierOutput:
        hidden, every = self._final_states(
            input_ids, attention_mask, inputs_embeds, _layer_outputs(options, self.config)
        )
        pad = getattr(self.config, "pad_token_id", None)
        if attention_mask is None and input_ids is not None and pad is not None:
            attention_mask = input_ids != pad  # transformers' rule without a mask: the last token not a pad
        pooled = hidden[:, -1] if attention_mask is None else last_tokens(hidden, attention_mask)
        logits = self.score(pooled.to(self.score.weight.dtype))
        loss = None
        if labels is not None:  # transformers' own: float labels over several classes are multi-label targets
            loss = ForSequenceClassificationLoss(labels, logits.float(), self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=every)


class _PipelineCheck(logging.Filter):
    """transformers' pipelines log an error for a model whose class is not in their task's list ("The model
    'DistributedModelForCausalLM' is not supported for text-generation. Supported models are [...]", a few KB),
    then run it as any model: a user of `pipeline("text-generation", model=swarm_model)` would read that it is
    not supported. This drops that record for our classes."""

    NAMES = tuple(
        c.__name__
        for c in (DistributedModel, DistributedModelForCausalLM, DistributedModelForSequenceClassification)
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"The model '{name}' is not supported for") for name in self.NAMES)


logging.getLogger("transformers.pipelines.base").addFilter(_PipelineCheck())


class AutoDistributedModel:
    """The base model (`last_hidden_state`, as transformers' `AutoModel`), e.g. for embeddings."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs) -> DistributedModel:
        return DistributedModel.from_pretrained(name_or_path, **kwargs)


class AutoDistributedModelForCausalLM:
    """Like transformers' Auto classes: picks the distributed model class for a checkpoint."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(name_or_path, **kwargs)


class AutoDistributedModelForSequenceClassification:
    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs) -> DistributedModelForSequenceClassification:
        return DistributedModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
