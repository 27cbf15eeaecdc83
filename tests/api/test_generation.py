"""Text from tokens as the API sends it (no network): pieces never end inside a character or the start of a stop
string, stop strings and EOS end the text, and the pieces joined are the whole text."""

import pytest
import torch

from swarmllm.api.generation import (
    LogitBias,
    LogprobRecorder,
    OutputPenalties,
    PieceStreamer,
    SeededSampler,
    TextAssembler,
    TokenTexts,
    chat_prompt,
    prompt_logprobs,
)
from swarmllm.models.tiny import tiny_tokenizer

# a toy detokenizer: each token id is one character of this table; 9 and 10 are the two halves of "é"
TABLE = {i: c for i, c in enumerate("abc XYZ\n!")}


def decode(tokens: list[int]) -> str:
    out, i = "", 0
    while i < len(tokens):
        if tokens[i] == 9:
            out += "é" if i + 1 < len(tokens) and tokens[i + 1] == 10 else "\ufffd"
            i += 2
            continue
        out += TABLE[tokens[i]]
        i += 1
    return out


def run(tokens, stop=(), eos=(), min_tokens=0):
    assembler = TextAssembler(decode, stop, eos, min_tokens)
    pieces = [assembler.add(t) for t in tokens]
    pieces.append(assembler.finish())
    return pieces, assembler


def test_plain_pieces_join_to_the_text():
    pieces, assembler = run([0, 1, 2, 3, 0])
    assert pieces == ["a", "b", "c", " ", "a", ""] and assembler.finish_reason is None
    assert len(assembler.tokens) == 5


def test_a_split_character_waits_for_its_second_half():
    pieces, _ = run([0, 9, 10, 1])
    assert pieces[:3] == ["a", "", "é"] and "".join(pieces) == "aéb"


def test_stop_string_is_held_back_then_cut():
    pieces, assembler = run([0, 4, 5, 6, 0], stop=["XY!", "YZ"])
    # "aX" -> "X" may start "XY!": held; "aXY" -> "Y" may start "YZ": held; "aXYZ" contains "YZ": cut there
    assert pieces[:4] == ["a", "", "", "X"] and assembler.finish_reason == "stop"
    assert "".join(pieces) == "aX" and pieces[4] == ""


def test_held_text_that_never_becomes_a_stop_is_sent():
    pieces, assembler = run([0, 4, 1], stop=["XY"])
    assert pieces == ["a", "", "Xb", ""] and assembler.finish_reason is None
    pieces, _ = run([0, 4], stop=["XY"])
    assert "".join(pieces) == "aX"  # generation ended: nothing can become a stop string any more


def test_eos_ends_the_text_and_is_counted_not_shown():
    pieces, assembler = run([0, 1, 8, 2], eos=[8])
    assert "".join(pieces) == "ab" and assembler.finish_reason == "stop" and assembler.tokens == [0, 1, 8]


def test_chat_prompt_fallback_without_a_template():
    class Plain:
        chat_template = None

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(Plain(), messages) == "system: Be brief.\nuser: Hi\nassistant:"


def test_seeded_sampler_is_reproducible_and_respects_the_distribution():
    scores = torch.log(torch.tensor([[0.0, 0.5, 0.5, 0.0]]) + 1e-12)
    draws = [int(SeededSampler(7)(None, scores).argmax()) for _ in range(2)]
    assert draws[0] == draws[1]
    sampler = SeededSampler(0)
    picks = {int(sampler(None, scores).argmax()) for _ in range(50)}
    assert picks == {1, 2}


def test_each_piece_carries_the_logprobs_of_the_tokens_it_sends():
    """Token by token as generate calls them: the recorder sees a step's scores, then the streamer its token. The
    split character's first half waits for its second, and its log-probability travels with it; EOS has none."""
    tokens = [0, 9, 10, 3, 1, 8]  # "a", "é" in two tokens, " ", "b", EOS
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(1, 11, generator=generator) for _ in tokens]
    recorder, emitted = LogprobRecorder(top=3), []
    streamer = PieceStreamer(TextAssembler(decode, eos_ids=[8]), emitted.append, recorder)
    streamer.put(torch.tensor([[5, 5]]))  # the prompt
    for token, step_scores in zip(tokens, scores, strict=True):
        recorder(None, step_scores)
        streamer.put(torch.tensor([token]))
    tail = streamer.finish()
    pieces = emitted + ([tail] if tail is not None else [])
    assert [(p.text, [e.token for e in p.logprobs]) for p in pieces] == [
        ("a", [0]),
        ("é", [9, 10]),
        (" ", [3]),
        ("b", [1]),
    ]
    entries = [e for p in pieces for e in p.logprobs]
    for entry, step_scores in zip(entries, scores, strict=False):
        logprobs = torch.log_softmax(step_scores[0], dim=-1)
        assert entry.logprob == pytest.approx(float(logprobs[entry.token]))
        want = logprobs.topk(3)
        assert [t for t, _ in entry.top] == want.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(want.values.tolist())


def test_rows_recorded_a_round_at_a_time_give_each_token_its_own_and_stay_in_step_past_a_stop():
    """A speculative round records several tokens' rows before the streamer gets them: the entries are those of
    one row per step; after a stop string the tokens of the round's rest still take (and drop) their rows."""
    tokens = [0, 4, 5, 1, 2, 3]  # "a", "X", "Y" (the stop), then a round's rest
    scores = torch.randn(len(tokens), 11, generator=torch.Generator().manual_seed(3))
    recorder, emitted = LogprobRecorder(top=2), []
    streamer = PieceStreamer(TextAssembler(decode, ["XY"], eos_ids=[8]), emitted.append, recorder)
    streamer.put(torch.tensor([[5]]))
    for start, end in ((0, 2), (2, 5)):  # rounds of 2 and 3 tokens
        recorder.record(scores[start:end])
        streamer.put(torch.tensor(tokens[start:end]))
    recorder(None, scores[5:6])  # a step past the stop
    streamer.put(torch.tensor([tokens[5]]))
    tail = streamer.finish()
    entries = [e for p in emitted + ([tail] if tail is not None else []) for e in p.logprobs]
    assert [e.token for e in entries] == tokens[:3]  # up to the stop, none of the tokens after it
    logprobs = torch.log_softmax(scores, dim=-1)
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(float(logprobs[i, e.token]))
        assert [t for t, _ in e.top] == logprobs[i].topk(2).indices.tolist()
    assert streamer.logprob_sum == pytest.approx(sum(float(logprobs[i, t]) for i, t in enumerate(tokens[:3])))
    assert not recorder._rows  # every row taken by its token


def test_a_prompts_logprobs_come_from_the_position_before_each_token():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(1))
    entries = prompt_logprobs([3, 7, 0, 5], logits, top=2)
    assert [e.token for e in entries] == [3, 7, 0, 5]
    assert entries[0].logprob is None and entries[0].top == ()
    logprobs = torch.log_softmax(logits, dim=-1)
    for i, e in enumerate(entries[1:]):
        assert e.logprob == pytest.approx(float(logprobs[i, e.token]))
        assert [t for t, _ in e.top] == logprobs[i].topk(2).indices.tolist()


def test_token_texts_join_to_the_text_where_tokens_decoded_alone_do_not():
    """A word-level tokenizer (like SentencePiece) decodes a token alone without the space before it."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer("the cat and the dog")["input_ids"]
    assert "".join(tokenizer.decode([t]) for t in ids) != tokenizer.decode(ids)
    texts = TokenTexts(tokenizer.decode, ids[:2])
    pieces = []
    for token in ids[2:]:
        pieces.append(texts.text(token))
        texts.push(token)
    assert "".join(pieces) == tokenizer.decode(ids)[len(tokenizer.decode(ids[:2])) :]
    assert pieces[0] == " and"


def test_stop_strings_count_only_after_min_tokens():
    """vLLM's rule: a stop string made within the first min_tokens tokens does not end the text (its start is
    held back, as any text that may grow into one); one that ends after them does, and none of it is sent."""
    pieces, assembler = run([0, 4, 5, 1, 4, 5, 2], stop=["XY"], min_tokens=3)
    assert pieces[:3] == ["a", "", "XY"] and assembler.finish_reason == "stop"
    assert "".join(pieces) == "aXYb"  # cut at the second "XY", made after the third token
    pieces, assembler = run([0, 4, 5], stop=["XY"], min_tokens=2)
    assert "".join(pieces) == "a" and assembler.finish_reason == "stop"  # its third token may stop it


def test_best_of_ranks_by_every_generated_tokens_logprob_eos_included():
    tokens = [0, 1, 8]
    scores = [torch.randn(1, 11, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    recorder = LogprobRecorder(top=0)
    streamer = PieceStreamer(TextAssembler(decode, eos_ids=[8]), lambda piece: None, recorder)
    streamer.put(torch.tensor([[5]]))
    for token, step_scores in zip(tokens, scores, strict=True):
        recorder(None, step_scores)
        streamer.put(torch.tensor([token]))
    want = sum(float(torch.log_softmax(s[0], -1)[t]) for t, s in zip(tokens, scores, strict=True))
    assert streamer.logprob_sum == pytest.approx(want)


def test_logit_bias_and_output_penalties_equal_their_formulas():
    """Against a loop over tokens: bias adds per token; frequency counts each generated occurrence, presence
    once per generated token, and the prompt's tokens count for neither."""
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 11, generator=generator, dtype=torch.float64)
    bias = {3: -100.0, 7: 2.5, 0: 0.25}
    want = scores.clone()
    for token, value in bias.items():
        want[:, token] += value
    assert torch.equal(LogitBias(bias)(None, scores), want)
    ids = torch.tensor([[1, 2, 2, 3, 3, 3, 9], [4, 4, 4, 5, 6, 6, 1]])
    prompt_length, frequency, presence = 3, 0.7, -0.4
    got = OutputPenalties(prompt_length, frequency, presence)(ids, scores)
    want = scores.clone()
    for row in range(2):
        generated = ids[row, prompt_length:].tolist()
        for token in set(generated):
            want[row, token] -= frequency * generated.count(token) + presence
    assert torch.allclose(got, want)
