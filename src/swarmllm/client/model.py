"""The user-facing model: embeddings, final norm and LM head held locally, every block served by the swarm.

It is a `transformers` PreTrainedModel with GenerationMixin, so `generate()` brings greedy and sampled decoding,
stopping criteria, streamers and padded batches as users know them. Generation runs with transformers' own cache
off: the KV cache lives on the servers, in an `InferenceSession`; each forward call sends only the tokens the
session has not seen yet (the longest common prefix with what it holds is reused, so a chat that resends the
whole conversation costs only its new turn).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarmllm.client.loop import run_sync
from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.dht.records import dht_prefix_for
from swarmllm.models import ClientHead, load_client_head

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class RemoteSession:
    """A user's handle on an inference session, plus the tokens it holds (for prefix reuse)."""

    def __init__(self, session: InferenceSession):
        self.session = session
        self.input_ids: torch.Tensor | None = None  # [batch, position]
        self.attention_mask: torch.Tensor | None = None

    @property
    def position(self) -> int:
        return self.session.position

    @property
    def max_length(self) -> int:
        return self.session.max_length

    def reusable_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """How many leading tokens of `input_ids` the servers already hold."""
        if self.input_ids is None or self.input_ids.shape[0] != input_ids.shape[0]:
            return 0
        n = min(self.position, input_ids.shape[1])
        if torch.equal(self.input_ids[:, :n], input_ids[:, :n]) and torch.equal(
            self.attention_mask[:, :n], attention_mask[:, :n]
        ):
            return n  # the common case, a generate's next step: everything held is reused
        same = (self.input_ids[:, :n] == input_ids[:, :n]) & (
            self.attention_mask[:, :n] == attention_mask[:, :n]
        )
        mismatch = (~same.all(dim=0)).nonzero()
        return int(mismatch[0]) if len(mismatch) else n


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "head"
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, head: ClientHead, swarm: SwarmClient):
        super().__init__(config)
        self.head = head
        self.swarm = swarm
        self._sessions = threading.local()  # each thread its own active session: concurrent generates
        self.generation_config.use_cache = False  # the cache is on the servers, see the module docstring

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        initial_peers: Sequence[str],
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **swarm_options,
    ) -> DistributedModelForCausalLM:
        """Load the local parts of a model (hub id or local folder) and join the swarm serving its blocks.

        ``swarm_key=FILE`` joins a private swarm (the file its servers were started with ``--swarm-key``); the
        other ``swarm_options`` go to `SwarmClient`."""
        hf_config, head = load_client_head(name_or_path, dtype=dtype, device=device)
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {hf_config.model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})"
            )
        swarm = SwarmClient(
            initial_peers,
            dht_prefix or dht_prefix_for(name_or_path),
            hf_config.num_hidden_layers,
            **swarm_options,
        )
        run_sync(swarm.start())
        model = cls(hf_config, head, swarm)
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = model.generation_config.from_pretrained(name_or_path)
            model.generation_config.use_cache = False
        return model.eval()

    @property
    def _active(self) -> RemoteSession | None:
        """The inference session of the calling thread (threads that generate at once each have their own)."""
        return getattr(self._sessions, "active", None)

    @_active.setter
    def _active(self, session: RemoteSession | None) -> None:
        self._sessions.active = session

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head.lm_head

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[RemoteSession]:
        """Keep server caches across calls: every `generate` / forward inside reuses this session (it belongs to
        the calling thread: several threads may each hold one on the same model and generate at once)."""
        if self._active is not None:
            raise RuntimeError("an inference session is already active on this model")
        self._active = RemoteSession(InferenceSession(self.swarm, max_length))
        try:
            yield self._active
        finally:
            session, self._active = self._active, None
            run_sync(session.session.close())

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        if kwargs.get("num_beams", 1) > 1:
            raise NotImplementedError("beam search is not supported yet; use greedy or sampling")
        kwargs["use_cache"] = False
        if self._active is not None:
            return super().generate(inputs, *args, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        config = kwargs.get("generation_config") or self.generation_config
        max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        max_length = (
            input_ids.shape[1] + max_new
            if max_new is not None
            else kwargs.get("max_length", config.max_length)
        )
        with self.inference_session(max_length=max_length):
            return super().generate(inputs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> CausalLMOutputWithPast:
        """Logits of the tokens sent: all of them without a session; inside one, only those it had not seen."""
        if self._active is not None and input_ids is not None:
            hidden = self._session_forward(input_ids, attention_mask)
        else:
            hidden = self.head.embed(input_ids) if inputs_embeds is None else inputs_embeds
            mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
            hidden = run_sync(self.swarm.forward(hidden, mask))
        weight = self.head.lm_head.weight
        logits = self.head.logits(hidden.to(weight.device, weight.dtype))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _session_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        active = self._active
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        start = min(active.reusable_prefix(input_ids, mask), input_ids.shape[1] - 1)
        new_mask = mask[:, start:]
        hidden = self.head.embed(input_ids[:, start:])
        padded = not bool(mask.all())
        out = run_sync(active.session.step(hidden, new_mask if padded else None, position=start))
        active.input_ids, active.attention_mask = input_ids, mask
        return out

    def shutdown(self) -> None:
        run_sync(self.swarm.shutdown())


class AutoDistributedModelForCausalLM:
    """Like transformers' Auto classes: picks the distributed model class for a checkpoint."""

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(name_or_path, **kwargs)
