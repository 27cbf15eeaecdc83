"""Ladder Residual blocks against the issue's recurrence written over transformers' own sub-layers
(tests/ladder_reference.py); conversion and retraining of a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from ladder_reference import reference_logits
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from swarmllm.cli import main
from swarmllm.models import KVCache, load_config, load_span
from swarmllm.models.causal_lm import load_causal_lm
from swarmllm.models.convert import CONVERSION_FILE, convert_to_ladder, distill, save_weights
from swarmllm.models.tiny import FAMILIES

ATOL = 1e-4
SEQ_LEN = 10  # longer than mistral's tiny sliding window (4)
# mixed (standard, ladder, ladder, standard) and all ladder, over the tiny checkpoints' 4 layers
LAYERS = {"mixed": (1, 3), "all": (0, 4)}


@pytest.fixture(scope="module")
def ladder_checkpoints(checkpoints, tmp_path_factory):
    """(family, layers name) -> a converted checkpoint folder, built once."""
    root = tmp_path_factory.mktemp("ladder")
    built = {}

    def get(family: str, which: str):
        if (family, which) not in built:
            built[family, which] = convert_to_ladder(
                checkpoints(family), root / f"{family}-{which}", *LAYERS[which]
            )
        return built[family, which]

    return get


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def random_ids(vocab_size: int, batch: int = 2, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", LAYERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_the_reference_recurrence(ladder_checkpoints, family, which):
    path = ladder_checkpoints(family, which)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model = load_causal_lm(path)
    assert model.config.ladder_layers == tuple(range(*LAYERS[which]))
    ids = random_ids(model.config.vocab_size)
    want = reference_logits(hf, ids, set(range(*LAYERS[which])))
    torch.testing.assert_close(model(ids), want, atol=ATOL, rtol=0)
    # transformers itself ignores the field: the ladder model really is a different function
    assert not torch.allclose(hf(ids).logits, want, atol=1e-2)


@pytest.mark.parametrize("which", LAYERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decode_equals_forward(ladder_checkpoints, family, which):
    """Prefill in chunks through the cache, then one token at a time through the lean decode path."""
    model = load_causal_lm(ladder_checkpoints(family, which))
    span, config = model.span, model.config
    hidden = model.head.embed(random_ids(config.vocab_size))
    full = span(hidden)
    cache = KVCache(config.num_layers, 2, SEQ_LEN + 4, config, torch.float32, "cpu")
    cache.keys.fill_(1e4)  # garbage in unused slots must never leak into attention
    cache.values.fill_(1e4)
    outputs = [span(hidden[:, :3], cache=cache), span(hidden[:, 3:5], pos=3, cache=cache)]
    for pos in range(5, SEQ_LEN):
        static = (
            pos % 2 == 0
        )  # alternate exact and fixed-size (CUDA-graph style, future slots masked) attention
        length = SEQ_LEN + 4 if static else pos + 1
        key_mask = torch.ones(2, length, dtype=torch.bool) if static else None
        out = span.decode(
            hidden[:, pos],
            torch.full((2,), pos),
            torch.tensor([pos]),
            cache.keys[:, :, :, :length],
            cache.values[:, :, :, :length],
            key_mask,
        )
        outputs.append(out[:, None])
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_generation_uses_the_decode_path_consistently(ladder_checkpoints):
    model = load_causal_lm(ladder_checkpoints("llama", "mixed"))
    ids = random_ids(model.config.vocab_size, batch=1, length=5)
    out = model.generate_greedy(ids, 6)
    assert torch.equal(out[:, :5], ids)
    # each generated token is the argmax of a full forward over everything before it
    assert torch.equal(model(out[:, :-1])[:, 4:].argmax(-1), out[:, 5:])


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_spans_split_anywhere_hand_on_the_pair_exactly_where_needed(ladder_checkpoints, cut):
    """Cut 2 lies inside the ladder region (layers 1 and 2): the state crossing it is (r, p); cuts 1 and 3 carry r."""
    path = ladder_checkpoints("qwen2", "mixed")
    config = load_config(path)[1]
    whole, first, second = load_span(path, 0, 4), load_span(path, 0, cut), load_span(path, cut, 4)
    hidden = torch.randn(2, SEQ_LEN, config.hidden_size, generator=torch.Generator().manual_seed(3))
    r, p = first.forward_pair(hidden, None)
    assert (p is not None) == (cut == 2) == config.carries_pending(cut)
    out, none = second.forward_pair(r, p)
    assert none is None
    torch.testing.assert_close(out, whole(hidden), atol=1e-5, rtol=0)
    if cut == 2:
        with pytest.raises(ValueError, match="ladder pair"):
            first(hidden)
        with pytest.raises(ValueError, match="p is required"):
            second.forward_pair(r, None)
    else:
        torch.testing.assert_close(second(first(hidden)), whole(hidden), atol=1e-5, rtol=0)


def test_decode_pair_across_a_ladder_boundary(ladder_checkpoints):
    path = ladder_checkpoints("mistral", "all")
    config = load_config(path)[1]
    whole, first, second = load_span(path, 0, 4), load_span(path, 0, 2), load_span(path, 2, 4)
    hidden = torch.randn(1, 6, config.hidden_size, generator=torch.Generator().manual_seed(4))
    caches = [KVCache(n, 1, 6, config, torch.float32, "cpu") for n in (2, 2)]
    r, p = first.forward_pair(hidden[:, :5], None, cache=caches[0])
    second.forward_pair(r, p, cache=caches[1])
    args = (torch.tensor([5]), torch.tensor([5]))
    r, p = first.decode_pair(hidden[:, 5], None, *args, caches[0].keys, caches[0].values)
    out, _ = second.decode_pair(r, p, *args, caches[1].keys, caches[1].values)
    torch.testing.assert_close(out, whole(hidden)[:, 5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cut", [None, 2])
def test_merged_decode_of_several_sessions_equals_their_own_decode(ladder_checkpoints, cut):
    """Continuous batching (`decode_batch`) runs ladder layers as ladder layers, and carries the pair where the
    span ends (cut 2) or starts inside the ladder region: every session's rows equal its own `decode_pair`."""
    from swarmllm.models.llama import DecodeSegment

    path = ladder_checkpoints("llama", "all")
    config = load_config(path)[1]
    spans = [load_span(path, 0, 4)] if cut is None else [load_span(path, 0, cut), load_span(path, cut, 4)]
    generator = torch.Generator().manual_seed(7)
    lengths = [3, 6]  # two sessions, at different positions
    caches = [[KVCache(len(s.blocks), 1, 8, config, torch.float32, "cpu") for s in spans] for _ in lengths]
    for session in caches:
        for cache in session:
            cache.keys.normal_(generator=generator)
            cache.values.normal_(generator=generator)
    r = torch.randn(len(lengths), config.hidden_size, generator=generator)
    positions, p = torch.tensor(lengths), None
    for n, span in enumerate(spans):
        want_r, want_p = [], []
        for row, length in enumerate(lengths):
            cache, slot = caches[row][n], torch.tensor([length])
            keys, values = cache.keys[:, :, :, : length + 1], cache.values[:, :, :, : length + 1]
            mine = None if p is None else p[row : row + 1]
            out_r, out_p = span.decode_pair(
                r[row : row + 1], mine, positions[row : row + 1], slot, keys, values
            )
            want_r.append(out_r)
            want_p.append(out_p)
        segments = [
            DecodeSegment(
                slice(row, row + 1),
                torch.tensor([length]),
                caches[row][n].keys[:, :, :, : length + 1],
                caches[row][n].values[:, :, :, : length + 1],
                None,
                None,
            )
            for row, length in enumerate(lengths)
        ]
        r, p = span.decode_batch_pair(r, p, positions, segments)
        torch.testing.assert_close(r, torch.cat(want_r), atol=1e-5, rtol=0)
        assert (p is None) == (want_p[0] is None) == (span.end == 4)
        if p is not None:
            torch.testing.assert_close(p, torch.cat(want_p), atol=1e-5, rtol=0)
            with pytest.raises(ValueError, match="ladder pair"):
                span.decode_batch(r, positions, segments)


def test_decode_traces_as_one_graph(ladder_checkpoints):
    """torch.compile(fullgraph=True), as DecodeRunner compiles it: no graph break in the ladder wiring."""
    span = load_span(ladder_checkpoints("llama", "mixed"), 0, 4)
    config = span.config
    cache = KVCache(4, 1, 8, config, torch.float32, "cpu")
    hidden = torch.randn(1, config.hidden_size, generator=torch.Generator().manual_seed(5))
    args = (
        hidden,
        torch.tensor([0]),
        torch.tensor([0]),
        cache.keys,
        cache.values,
        torch.ones(1, 8, dtype=torch.bool),
    )
    want = span.decode(*args)
    torch._dynamo.reset()
    got = torch.compile(span.decode, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_ladder_layers_is_the_standard_model_bit_for_bit(checkpoints, tmp_path, family):
    source = checkpoints(family)
    empty = convert_to_ladder(source, tmp_path / "ladder", 0, 1)
    hf_json = json.loads((empty / "config.json").read_text())
    hf_json["ladder_layers"] = []
    (empty / "config.json").write_text(json.dumps(hf_json))
    standard, explicit = load_causal_lm(source), load_causal_lm(empty)
    assert explicit.config.ladder_layers == ()
    ids = random_ids(standard.config.vocab_size)
    assert torch.equal(standard(ids), explicit(ids))
    assert torch.equal(standard.generate_greedy(ids, 4), explicit.generate_greedy(ids, 4))
    hidden = standard.head.embed(ids)
    r, p = standard.span.forward_pair(hidden, None)
    assert p is None and torch.equal(r, explicit.span(hidden))


def test_bad_ladder_layers_are_refused(checkpoints, tmp_path):
    path = convert_to_ladder(checkpoints("llama"), tmp_path / "bad", 0, 1)
    for bad in ([2, 1], [1, 1], [4], [-1]):
        hf_json = json.loads((path / "config.json").read_text())
        hf_json["ladder_layers"] = bad
        (path / "config.json").write_text(json.dumps(hf_json))
        with pytest.raises(ValueError, match="ladder_layers"):
            load_config(path)


def test_convert_copies_the_tensors_and_adds_only_the_field(checkpoints, tmp_path):
    source = checkpoints("llama", shard=True)
    dst = tmp_path / "converted"
    assert main(["ladder", "convert", str(source), str(dst), "--layers", "2:4"]) == 0
    for path in source.iterdir():
        if path.name != "config.json":
            assert (dst / path.name).read_bytes() == path.read_bytes(), path.name
    before, after = (json.loads((d / "config.json").read_text()) for d in (source, dst))
    assert after.pop("ladder_layers") == [2, 3]
    assert after == before
    assert json.loads((dst / CONVERSION_FILE).read_text()) == {
        "source": str(source.resolve()),
        "layers": [2, 4],
    }
    assert load_config(dst)[1].ladder_layers == (2, 3)


@pytest.mark.parametrize("layers", ["3:5", "2:2", "3:1", "-1:2"])
def test_convert_refuses_layers_outside_the_model(checkpoints, tmp_path, layers, capsys):
    assert (
        main(["ladder", "convert", str(checkpoints("llama")), str(tmp_path / "x"), f"--layers={layers}"]) == 2
    )
    assert "layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_refuses_to_overwrite(checkpoints, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_to_ladder(checkpoints("llama"), tmp_path / "x", 0, 2)


def test_saved_weights_round_trip_through_the_checkpoint_files(checkpoints, tmp_path):
    path = convert_to_ladder(checkpoints("qwen2", shard=True), tmp_path / "c", 2, 4)
    model = load_causal_lm(path)
    for param in model.parameters():
        param.add_(0.01)
    save_weights(model, path)
    again = load_causal_lm(path)
    for (name, want), got in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" not in names  # qwen2 ties: still no separate head tensor


def test_distillation_brings_the_ladder_model_back_towards_the_source(checkpoints, tmp_path):
    source = checkpoints("llama")
    path = convert_to_ladder(source, tmp_path / "d", 0, 4)
    teacher, student = load_causal_lm(source), load_causal_lm(path)
    ids = random_ids(teacher.config.vocab_size, batch=8, length=12, seed=9)
    losses = []
    with torch.enable_grad():
        distill(
            student, teacher, iter([ids] * 30), 30, lr=3e-3, on_step=lambda step, loss: losses.append(loss)
        )
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    gap_after = (student(ids) - teacher(ids)).abs().mean()
    gap_before = (load_causal_lm(path)(ids) - teacher(ids)).abs().mean()
    assert gap_after < 0.5 * gap_before


def test_retrain_command_reports_three_perplexities_and_writes_the_weights(checkpoints, tmp_path, capsys):
    path = convert_to_ladder(checkpoints("llama"), tmp_path / "r", 2, 4)
    data = tmp_path / "data.txt"
    words = "the cat sat on the mat and the dog ran to the sun . ".split()
    data.write_text(" ".join(words[(i * 7) % len(words)] for i in range(800)))
    before = load_causal_lm(path).state_dict()["span.blocks.3.mlp.down_proj.weight"].clone()
    with torch.enable_grad():
        args = ["--data", str(data), "--steps", "6", "--seq-len", "16", "--batch-size", "4"]
        assert main(["ladder", "retrain", str(path), *args]) == 0
    out = capsys.readouterr().out
    for stage in ("before conversion", "after conversion", "after retraining"):
        assert stage in out
    assert "step 6/6" in out
    after = load_causal_lm(path).state_dict()["span.blocks.3.mlp.down_proj.weight"]
    assert not torch.equal(before, after)


def test_lora_and_deep_prompts_reach_ladder_layers(ladder_checkpoints):
    """A request's LoRA on every projection equals the same span with the update merged into its weights, in
    forward and decode; a deep prompt before a ladder layer equals adding it to the stream by hand."""
    from swarmllm.models.llama import BlockLora, Lora

    path = ladder_checkpoints("qwen2", "mixed")
    span, merged = load_span(path, 0, 4), load_span(path, 0, 4)
    generator = torch.Generator().manual_seed(6)
    loras = []
    for block, target in zip(span.blocks, merged.blocks, strict=True):
        parts = {}
        for name, module, merged_module in (
            ("qkv_proj", block.self_attn.qkv_proj, target.self_attn.qkv_proj),
            ("o_proj", block.self_attn.o_proj, target.self_attn.o_proj),
            ("gate_up_proj", block.mlp.gate_up_proj, target.mlp.gate_up_proj),
            ("down_proj", block.mlp.down_proj, target.mlp.down_proj),
        ):
            down = torch.randn(2, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, 2, generator=generator) * 0.1
            parts[name] = Lora(down, up, (2,))
            merged_module.weight += up @ down
        loras.append(BlockLora(**parts))
    hidden = torch.randn(1, 6, span.config.hidden_size, generator=generator)
    want = merged(hidden)
    torch.testing.assert_close(span(hidden, lora=loras), want, atol=1e-5, rtol=0)
    cache = KVCache(4, 1, 6, span.config, torch.float32, "cpu")
    span(hidden[:, :5], cache=cache, lora=loras)
    step = span.decode(
        hidden[:, 5], torch.tensor([5]), torch.tensor([5]), cache.keys, cache.values, lora=loras
    )
    torch.testing.assert_close(step, want[:, 5], atol=1e-5, rtol=0)

    prompts = torch.zeros(4, 1, 2, span.config.hidden_size)
    prompts[2] = torch.randn(1, 2, span.config.hidden_size, generator=generator)  # before ladder layer 2
    first, second = load_span(path, 0, 2), load_span(path, 2, 4)
    r, p = first.forward_pair(hidden, None)
    r = torch.cat([r[:, :2] + prompts[2], r[:, 2:]], dim=1)
    torch.testing.assert_close(span(hidden, prompts=prompts), second.forward_pair(r, p)[0], atol=1e-5, rtol=0)
