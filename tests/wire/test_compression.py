"""Compressed activations: each codec's error against float32, its bytes on the wire, and session messages that
carry compressed hidden states (and refuse malformed ones)."""

import pytest
import torch

from swarmllm.wire import RequestError
from swarmllm.wire.compression import BLOCK, CODECS, bytes_per_value, compress, decompress
from swarmllm.wire.framing import Frame, Kind, encode_frame
from swarmllm.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    OpenSession,
    Step,
    StepReply,
)

# per-token relative L2 error against float32, at most (hidden states with a few outlier dimensions, as LLMs have)
MAX_ERROR = {"none": 0.0, "float16": 1e-3, "bfloat16": 5e-3, "blockwise8": 2e-2}


def activations(hidden_size=256, tokens=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, hidden_size, generator=generator)
    x[..., 3] *= 40  # an outlier dimension, like the massive activations of trained LLMs
    return x


def wire_bytes(message) -> int:
    return sum(len(part) for part in encode_frame(Frame(Kind.MESSAGE, 1, message)))


@pytest.mark.parametrize("codec", CODECS)
def test_codec_error_against_float32(codec):
    x = activations()
    values, scales = compress(x, codec)
    y = decompress(values, scales)
    assert y.dtype == torch.float32 and y.shape == x.shape
    error = ((y - x).norm(dim=-1) / x.norm(dim=-1)).max()
    assert error <= MAX_ERROR[codec]
    # compressing the decompressed states again gives the same wire tensors (a client resending a server's
    # output after a failed push sends what the push carried)
    again = compress(y, codec)
    assert torch.equal(again[0], values) and (scales is None or torch.equal(again[1], scales))


def test_blockwise8_keeps_an_outlier_block_to_itself_and_zeros_exact():
    x = activations(hidden_size=200)  # not a multiple of BLOCK: the last block is short
    x[0, 0] = 0
    y = decompress(*compress(x, "blockwise8"))
    assert torch.equal(y[0, 0], torch.zeros(200))
    away = torch.ones(200, dtype=torch.bool)
    away[:BLOCK] = False  # the outlier dimension's block
    rest, decoded = x[1][..., away], y[1][..., away]
    error = ((decoded - rest).abs() / rest.abs().amax(-1, keepdim=True)).max()
    # half a step of (at most) the rest's largest value over 127, whatever the outlier (+ the scale's rounding)
    assert error <= 0.5 / 127 * 1.01


def test_8bit_activations_halve_the_bytes_on_the_wire():
    """Whole step messages of one decode token (hidden 4096, Llama-2-7B's), as framed for the wire."""
    hidden = torch.randn(1, 1, 4096)
    sizes = {codec: wire_bytes(Step(5, hidden, compression=codec).to_message()) for codec in CODECS}
    assert sizes["float16"] / sizes["blockwise8"] > 1.85
    assert sizes["none"] / sizes["float16"] > 1.9
    assert bytes_per_value("blockwise8") == 1 + 2 / BLOCK


@pytest.mark.parametrize("codec", CODECS)
def test_step_and_reply_carry_compressed_hidden_states(codec):
    """r, and a ladder pair's p where one travels, in the session's codec both."""
    x, p = activations(hidden_size=64, tokens=3), activations(hidden_size=64, tokens=3) * 0.5
    step = Step.parse(Step(4, x, step=2, compression=codec).to_message())
    want, want_p = decompress(*compress(x, codec)), decompress(*compress(p, codec))
    assert step.position == 4 and step.hidden.shape == x.shape and step.pending is None
    torch.testing.assert_close(step.hidden.float(), want, rtol=0, atol=0)
    reply = StepReply(4, 2, x, compression=codec).to_message()
    hidden, pending = StepReply.states(reply)
    torch.testing.assert_close(hidden.float(), want, rtol=0, atol=0)
    assert pending is None
    pair = Step.parse(Step(4, x, step=2, compression=codec, pending=p).to_message())
    torch.testing.assert_close(pair.hidden.float(), want, rtol=0, atol=0)
    torch.testing.assert_close(pair.pending.float(), want_p, rtol=0, atol=0)
    hidden, pending = StepReply.states(StepReply(4, 2, x, compression=codec, pending=p).to_message())
    torch.testing.assert_close(hidden.float(), want, rtol=0, atol=0)
    torch.testing.assert_close(pending.float(), want_p, rtol=0, atol=0)
    opened = OpenSession.parse(OpenSession(0, 2, 2, 16, compression=codec).to_message())
    assert opened.compression == codec


def test_malformed_compressed_steps_are_refused():
    x = activations(hidden_size=64, tokens=3)
    good = Step(0, x, compression="blockwise8").to_message()
    names = good.meta["tensors"]
    codes, scales = good.tensors[names.index("hidden")], good.tensors[names.index("hidden_scales")]
    for tensors, meta in [
        ([codes], {}),  # int8 without scales
        ([codes, scales[:, :, :0]], {"tensors": ["hidden", "hidden_scales"]}),  # scales that do not fit
        ([codes, scales.float()], {"tensors": ["hidden", "hidden_scales"]}),  # scales of the wrong dtype
        ([x, scales], {"tensors": ["hidden", "hidden_scales"]}),  # scales for float states
    ]:
        message = Step(0, x).to_message()
        message.meta.update(meta)
        message.tensors = tensors
        with pytest.raises(RequestError):
            Step.parse(message)
    bad_open = OpenSession(0, 2, 1, 8).to_message()
    bad_open.meta["compression"] = "zip"
    with pytest.raises(RequestError):
        OpenSession.parse(bad_open)


@pytest.mark.parametrize("codec", CODECS)
def test_training_messages_carry_states_and_gradients_compressed(codec):
    """Forwards and backwards (fine-tuning) in the client's codec: the states and the gradients of the states,
    both ways, as `compress` then `decompress` give them; prompts' and adapters' gradients as computed."""
    x, p = activations(hidden_size=64, tokens=3), activations(hidden_size=64, tokens=3, seed=1)
    grad, grad_p = x * 1e-4, p * 1e-5  # gradients are small: the codecs' relative error is what counts

    def wire(t):
        return decompress(*compress(t, codec))

    forward = ForwardRequest.parse(ForwardRequest(0, 2, x, pending=p, compression=codec).to_message())
    assert forward.compression == codec
    assert torch.equal(forward.hidden.float(), wire(x)) and torch.equal(forward.pending.float(), wire(p))
    reply = ForwardReply.parse(ForwardReply(x, p, codec).to_message())
    assert torch.equal(reply.hidden.float(), wire(x)) and torch.equal(reply.pending.float(), wire(p))
    backward = BackwardRequest.parse(
        BackwardRequest(0, 2, x, grad, pending=p, grad_pending=grad_p, compression=codec).to_message()
    )
    assert backward.compression == codec
    for got, want in [
        (backward.hidden, x),
        (backward.grad, grad),
        (backward.pending, p),
        (backward.grad_pending, grad_p),
    ]:
        assert torch.equal(got.float(), wire(want))
    prompts, lora = torch.randn(2, 1, 3, 64), {"0.q_proj.lora_A": torch.randn(4, 64)}
    answer = BackwardReply.parse(BackwardReply(grad, prompts, lora, grad_p, codec).to_message())
    assert torch.equal(answer.grad_hidden.float(), wire(grad)) and torch.equal(
        answer.grad_pending.float(), wire(grad_p)
    )
    assert torch.equal(answer.grad_prompts, prompts) and torch.equal(
        answer.grad_lora["0.q_proj.lora_A"], lora["0.q_proj.lora_A"]
    )


def test_8bit_training_messages_are_a_quarter_of_float32():
    """A backward of 512 tokens of hidden size 4096 (Llama-2-7B's), its input and gradient, and its reply."""
    x = activations(hidden_size=4096, tokens=256)
    sizes = {
        codec: wire_bytes(BackwardRequest(0, 2, x, x, compression=codec).to_message())
        + wire_bytes(BackwardReply(x, compression=codec).to_message())
        for codec in CODECS
    }
    assert sizes["blockwise8"] / sizes["none"] < 0.27 and sizes["bfloat16"] / sizes["none"] < 0.51
