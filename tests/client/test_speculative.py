"""Speculative decoding's loop and acceptance rule against a local target (our blocks over a KV cache that rewinds
as a server's does): greedy tokens equal transformers' plain and assisted greedy decoding, and sampled tokens
follow the target's distribution (chi-square over every pair of first tokens on a tiny vocabulary)."""

from __future__ import annotations

import pytest
import torch
from in_process import perturbed
from scipy.stats import chisquare
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)
from transformers import TemperatureLogitsWarper as Temperature

from swarmllm.client.speculative import SpeculationStats, accept_drafts, speculative_generate
from swarmllm.models import KVCache, load_client_head, load_span


class LocalTarget:
    """The target as the swarm gives it to the loop: (tokens, position) -> logits, over a cache that a step at
    an earlier position rewinds; `session()` starts a new one (a fresh cache)."""

    def __init__(self, path, max_length=64):
        _, self.head = load_client_head(path)
        self.span = load_span(path, 0, self.head.config.num_layers)
        self.max_length = max_length

    def session(self):
        cache = KVCache(len(self.span.blocks), 1, self.max_length, self.span.config, torch.float32, "cpu")

        @torch.no_grad()
        def verify(tokens, position):
            return self.head.logits(self.span(self.head.embed(tokens), pos=position, cache=cache))

        return verify


def local_target(path, max_length=64):
    return LocalTarget(path, max_length).session()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_accept_drafts_first_token_follows_the_target():
    generator = torch.Generator().manual_seed(0)
    vocab, k, runs = 5, 3, 8000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=generator), -1)
    q = torch.softmax(torch.randn(k, vocab, generator=generator), -1)
    counts = torch.zeros(vocab)
    accepted = 0
    for _ in range(runs):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=generator)[0] for i in range(k)])
        n, token = accept_drafts(drafts, q, p, generator)
        counts[int(drafts[0]) if n else token] += 1
        accepted += n
    assert chisquare(counts.numpy(), (p[0] * runs).numpy()).pvalue > 1e-3
    assert 0 < accepted < k * runs  # both paths taken


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_tokens_equal_plain_and_assisted_greedy(checkpoints, family):
    path = checkpoints(family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft = perturbed(path, noise=0.05)
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23]])
    want = reference.generate(prompt, max_new_tokens=20, do_sample=False)
    assisted = reference.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert assisted.tolist() == want.tolist()
    for k, adaptive in ((1, False), (4, False), (3, True)):
        stats = SpeculationStats()
        ours = speculative_generate(
            local_target(path),
            draft,
            prompt,
            max_new_tokens=20,
            num_draft_tokens=k,
            adaptive=adaptive,
            stats=stats,
        )
        assert ours.tolist() == want.tolist(), (k, adaptive)
        assert 0 < stats.accepted < stats.drafted  # drafts accepted and rejected (the cache rewound)
        assert stats.rounds < 20


def test_greedy_tokens_under_logits_processors_equal_transformers(checkpoints):
    """Processors that are functions of the prefix (a penalty, a bias) shape both models' logits at each prefix:
    the tokens are transformers' greedy ones under the same processors, and differ from those without them."""
    path = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23]])
    plain = reference.generate(prompt, max_new_tokens=16, do_sample=False)
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.5),
            SequenceBiasLogitsProcessor({(int(plain[0, 7]),): -50.0}),
        ]
    )
    want = reference.generate(prompt, max_new_tokens=16, do_sample=False, logits_processor=processors)
    assert want.tolist() != plain.tolist()
    stats = SpeculationStats()
    ours = speculative_generate(
        local_target(path),
        perturbed(path, noise=0.05),
        prompt,
        max_new_tokens=16,
        num_draft_tokens=3,
        processors=processors,
        stats=stats,
    )
    assert ours.tolist() == want.tolist() and 0 < stats.accepted < stats.drafted


def sampled_pairs_follow_the_target(path, draft, prompt: torch.Tensor, vocab: int) -> SpeculationStats:
    """Two tokens sampled speculatively after `prompt`, many times over: their joint frequencies match the
    target's p(x1) p(x2 | x1) (temperature 2 on both models; chi-square). Returns what the rounds did."""
    warpers = LogitsProcessorList([Temperature(2.0)])
    target = LocalTarget(path, max_length=8)
    verify, n = target.session(), prompt.shape[1]
    with torch.no_grad():
        first = torch.softmax(warpers(prompt, verify(prompt, 0)[:, -1]), -1)[0]
        want = torch.stack(
            [
                first[a] * torch.softmax(warpers(None, verify(torch.tensor([[a]]), n)[:, -1]), -1)[0]
                for a in range(vocab)
            ]
        ).flatten()
    generator = torch.Generator().manual_seed(1)
    runs, counts, stats = 1000, torch.zeros(vocab * vocab), SpeculationStats()
    for _ in range(runs):
        out = speculative_generate(
            target.session(),
            draft,
            prompt,
            max_new_tokens=2,
            num_draft_tokens=2,
            do_sample=True,
            processors=warpers,
            generator=generator,
            stats=stats,
        )
        counts[out[0, n] * vocab + out[0, n + 1]] += 1
    assert chisquare(counts.numpy(), (want * runs).numpy()).pvalue > 1e-3
    return stats


def tiny_shape(vocab: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, eos_token_id=None,
    )  # fmt: skip


def test_sampled_tokens_follow_the_target_distribution(tmp_path):
    """Two sampled tokens after a prompt, many times over, on a 6-token vocabulary: their joint frequencies
    match the target's p(x1) p(x2 | x1) (temperature 2 on both models), whatever the draft proposes."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_shape(6))).save_pretrained(tmp_path / "target")
    draft = LlamaForCausalLM(LlamaConfig(**tiny_shape(6))).eval()  # another random model: it disagrees often
    stats = sampled_pairs_follow_the_target(tmp_path / "target", draft, torch.tensor([[1, 3]]), 6)
    assert 0 < stats.accepted < stats.drafted


def test_a_held_prefix_is_not_sent_again_and_tokens_stream_round_by_round(checkpoints):
    """A target that holds the prompt's first tokens already (a kept session) is sent only the rest; a streamer
    gets the prompt, then each round's tokens; `stop` ends the loop after the round in which it turns true."""
    path = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft = perturbed(path, noise=0.05)
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23]])
    want = reference.generate(prompt, max_new_tokens=12, do_sample=False)
    verify, sent = local_target(path), []

    def recorded(tokens, position):
        sent.append((position, tokens.shape[1]))
        return verify(tokens, position)

    verify(prompt[:, :4], 0)  # an earlier request's
    puts = []

    class Streamer:
        def put(self, value):
            puts.append(value.reshape(-1).tolist())

        def end(self):
            puts.append("end")

    out = speculative_generate(
        recorded, draft, prompt, max_new_tokens=12, num_draft_tokens=3, held=4, streamer=Streamer()
    )
    assert out.tolist() == want.tolist()
    assert sent[0] == (4, 1)  # the prompt's one token neither held nor starting a round
    assert puts[0] == prompt[0].tolist() and puts[-1] == "end"
    assert sum(puts[1:-1], []) == out[0, 6:].tolist() and len(puts) - 2 == len(sent) - 1  # one put a round
    stopped = speculative_generate(
        local_target(path),
        draft,
        prompt,
        max_new_tokens=12,
        num_draft_tokens=3,
        stop=lambda ids: ids.shape[1] >= 9,
    )
    assert 9 <= stopped.shape[1] <= 9 + 3 and stopped.tolist() == want[:, : stopped.shape[1]].tolist()
    with pytest.raises(ValueError, match="must lack the last"):
        speculative_generate(local_target(path), draft, prompt, max_new_tokens=2, held=6)


def test_record_gets_the_targets_own_logits_of_each_new_token_before_the_streamer(checkpoints):
    """`record` is given, round by round and before the streamer, the target's logits at each new token as a
    full forward over the output gives them (before the processors, even one that shapes its scores in place),
    one row per token, EOS cut included."""
    path = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23]])

    class Halve:  # shapes in place: the rows recorded must be the target's own all the same
        def __call__(self, input_ids, scores):
            return scores.mul_(0.5)

    events = []

    class Streamer:
        def put(self, value):
            events.append(("put", value.reshape(-1).tolist()))

        def end(self):
            pass

    def generate(**options):
        draft, processors = perturbed(path, noise=0.05), LogitsProcessorList([Halve()])
        return speculative_generate(
            local_target(path),
            draft,
            prompt,
            max_new_tokens=14,
            num_draft_tokens=3,
            processors=processors,
            **options,
        )

    stats = SpeculationStats()
    out = generate(
        stats=stats, streamer=Streamer(), record=lambda rows: events.append(("record", rows.clone()))
    )
    assert stats.accepted > 0  # rounds of several tokens, so that rows are recorded several at a time
    rounds = [e for e in events if e[0] != "put" or e[1] != prompt[0].tolist()]
    assert [kind for kind, _ in rounds] == ["record", "put"] * stats.rounds
    for (_, rows), (_, tokens) in zip(rounds[::2], rounds[1::2], strict=True):
        assert rows.shape[0] == len(tokens)
    recorded = torch.cat([rows for kind, rows in rounds if kind == "record"])
    with torch.no_grad():
        want = reference(out).logits[0, prompt.shape[1] - 1 : -1]
    assert recorded.shape == want.shape
    torch.testing.assert_close(recorded, want, atol=1e-4, rtol=1e-4)
    eos = int(out[0, prompt.shape[1] + 4])  # a token the greedy run makes: with it as EOS the run ends there
    rows = []
    cut = generate(eos_token_ids={eos}, record=rows.append)
    assert sum(r.shape[0] for r in rows) == cut.shape[1] - prompt.shape[1] and int(cut[0, -1]) == eos


def test_prompt_lookup_proposes_what_transformers_candidate_generator_does():
    """`PromptLookup` against transformers' own `PromptLookupCandidateGenerator` (the reference: the same
    n-gram rule), over random sequences of a 4-token vocabulary (many matches) and of a large one (few)."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from swarmllm.client.speculative import PromptLookup

    generator = torch.Generator().manual_seed(0)
    found = 0
    for trial in range(400):
        vocab = 4 if trial % 2 else 1000
        length = int(torch.randint(2, 30, (), generator=generator))
        ids = torch.randint(0, vocab, (1, length), generator=generator)
        k, ngram = (
            int(torch.randint(1, 8, (), generator=generator)),
            int(torch.randint(1, 4, (), generator=generator)),
        )
        reference = PromptLookupCandidateGenerator(
            num_output_tokens=k, max_matching_ngram_size=ngram, max_length=length + 100
        )
        candidates, _ = reference.get_candidates(ids)
        want = candidates[0, length:].tolist()
        got, q = PromptLookup(ngram).propose(ids, k, None, False, None)
        assert got.tolist() == want and q is None, (ids.tolist(), k, ngram)
        found += bool(want)
    assert 50 < found < 400  # both: proposals and none


def test_prompt_lookup_greedy_tokens_equal_plain_greedy_and_samples_follow_the_target(checkpoints, tmp_path):
    """Prompt lookup's drafts (no draft model) are checked by the same loop: greedy tokens are plain greedy's
    with drafts accepted and rejected on the way; sampled first tokens follow the target's distribution (the
    drafts are certain: the rule's point-mass case)."""
    from swarmllm.client.speculative import PromptLookup

    path = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23, 17, 42, 99, 5]])
    want = reference.generate(prompt, max_new_tokens=24, do_sample=False)
    for k, ngram in ((2, 1), (5, 2), (8, 3)):
        stats = SpeculationStats()
        ours = speculative_generate(
            local_target(path),
            PromptLookup(ngram),
            prompt,
            max_new_tokens=24,
            num_draft_tokens=k,
            stats=stats,
        )
        assert ours.tolist() == want.tolist(), (k, ngram)
        assert 0 < stats.accepted < stats.drafted and stats.rounds < 24, (k, ngram, stats)

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_shape(4))).save_pretrained(tmp_path / "target")
    # PromptLookup(1) proposes 3: what followed the prompt's first 1
    stats = sampled_pairs_follow_the_target(
        tmp_path / "target", PromptLookup(1), torch.tensor([[1, 3, 2, 1]]), 4
    )
    assert 0 < stats.accepted < stats.drafted
