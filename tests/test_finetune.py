"""Fine-tuning through real server processes: gradients (inputs, shallow and deep prompts, LoRA A/B) equal local
autograd on the same checkpoint across a 3-server route, adapters of concurrent clients stay apart, adapters
round-trip through PEFT folders, hosted adapters route only via the servers that announce them, and a backward
survives the loss of a server."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from swarmllm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarmllm.client.loop import run_sync
from swarmllm.dht import find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models import load_client_head, load_config, load_span
from swarmllm.models.lora import LoraSettings, lora_shapes, write_peft_adapter

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

CHAIN = [(0, 1), (1, 3), (3, 4)]  # the route gradients are checked over: 3 servers
WHOLE = (0, 4)  # one more server, hosting an adapter; the backward's replacement when a chain server dies
HOSTED = (
    "my-styled.v2"  # a folder's name, as save_pretrained("my-adapter") makes one (every server refused "-")
)
TOL = dict(rtol=1e-4, atol=1e-5)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def random_lora(config, settings, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(config, settings, range(config.num_layers))
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def swarm(llama_checkpoint, tmp_path_factory):
    _, config = load_config(llama_checkpoint)
    hosted = tmp_path_factory.mktemp("adapters") / HOSTED
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj"))
    write_peft_adapter(hosted, settings, random_lora(config, settings, 99), str(llama_checkpoint))
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(str(llama_checkpoint), span) for span in CHAIN])
        local.add_server(str(llama_checkpoint), WHOLE, extra=["--adapters", str(hosted)])
        yield local, hosted


@pytest.fixture(scope="module")
def reference(llama_checkpoint):
    return AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()


def remote_model(path, local, cls=AutoDistributedModelForCausalLM, chain=True, **kwargs):
    kwargs = {"spot_check_fraction": 0, **kwargs}
    model = cls.from_pretrained(str(path), initial_peers=local.initial_peers, **kwargs)
    if chain:  # the three servers of CHAIN only
        servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))
        model.swarm.use_servers([s for s in servers if (s.start_block, s.end_block) in CHAIN])
    return model


def ids(batch=2, length=7, seed=0):
    return torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_random_adapter(model, seed):
    model.add_adapter(peft.LoraConfig(**LORA))
    model.lora.load_tensors(random_lora(model.block_config, model.lora.settings, seed))
    return model


def peft_reference(path, adapter_dir, trainable=False):
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def test_lora_gradients_equal_peft_autograd(swarm, llama_checkpoint, tmp_path):
    local, _ = swarm
    model = with_random_adapter(remote_model(llama_checkpoint, local), seed=1)
    try:
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            f"lora.weights.{i}" for i in range(len(model.lora.names))
        }
        x = ids()
        loss = model(x, labels=x).loss
        loss.backward()
        model.save_pretrained(tmp_path)
        theirs = peft_reference(llama_checkpoint, tmp_path, trainable=True)
        their_loss = theirs(input_ids=x, labels=x).loss
        their_loss.backward()
        torch.testing.assert_close(loss, their_loss, **TOL)
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        assert len(their_grads) == len(model.lora.names)
        for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
            layer, rest = name.split(".", 1)
            want = their_grads[f"base_model.model.model.layers.{layer}.{rest}.default.weight"]
            torch.testing.assert_close(weight.grad, want, **TOL)
        assert model.swarm.uploads.uploads == len(CHAIN)  # once per server for this version
    finally:
        model.shutdown()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_and_input_gradients_equal_local_autograd(swarm, llama_checkpoint, mode):
    local, _ = swarm
    model = remote_model(llama_checkpoint, local, tuning_mode=mode, pre_seq_len=3)
    try:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            if model.ptune.deep is not None:
                model.ptune.deep.copy_(torch.randn(model.ptune.deep.shape, generator=generator) * 0.1)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"ptune.prompts"} | ({"ptune.deep"} if mode == "deep_ptune" else set())
        x = ids(seed=3)
        embeds = model.head.embed(x).detach().requires_grad_()
        out = model(inputs_embeds=embeds, labels=x)
        assert out.logits.shape[1] == x.shape[1]  # the input tokens only
        out.loss.backward()

        _, head = load_client_head(llama_checkpoint)
        span = load_span(llama_checkpoint, 0, 4)
        prompts = model.ptune.prompts.detach().clone().requires_grad_()
        deep = None if model.ptune.deep is None else model.ptune.deep.detach().clone().requires_grad_()
        local_embeds = embeds.detach().clone().requires_grad_()
        hidden = torch.cat([prompts.expand(2, -1, -1), local_embeds], dim=1)
        hidden = span(hidden, prompts=None if deep is None else deep[:, None])
        logits = head.logits(hidden[:, 3:])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.testing.assert_close(out.loss, loss, **TOL)
        torch.testing.assert_close(embeds.grad, local_embeds.grad, **TOL)
        torch.testing.assert_close(model.ptune.prompts.grad, prompts.grad, **TOL)
        if deep is not None:
            torch.testing.assert_close(model.ptune.deep.grad, deep.grad, **TOL)

        # generate prepends the prompts once: its greedy tokens are those of repeated full forwards
        prompt = ids(batch=1, length=4, seed=4)
        tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        want = prompt
        with torch.no_grad():
            for _ in range(5):
                want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], dim=1)
        assert tokens.tolist() == want.tolist()
    finally:
        model.shutdown()


def test_concurrent_clients_adapters_never_mix(swarm, llama_checkpoint, reference, tmp_path):
    local, _ = swarm
    models = [with_random_adapter(remote_model(llama_checkpoint, local), seed) for seed in (5, 6)]
    plain = remote_model(llama_checkpoint, local)
    try:
        x = ids(seed=7)
        wants = []
        for i, model in enumerate(models):
            model.save_pretrained(tmp_path / str(i))
            with torch.no_grad():
                wants.append(peft_reference(llama_checkpoint, tmp_path / str(i))(x).logits)
        with torch.no_grad():
            plain_want = reference(x).logits

        def use(model, want, rounds=4):
            for _ in range(rounds):
                with torch.no_grad():
                    torch.testing.assert_close(model(x).logits, want, **TOL)
                if model.lora is not None:  # training traffic interleaved with the other clients'
                    model(x, labels=x).loss.backward()
            return True

        with ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(use, m, w) for m, w in zip([*models, plain], [*wants, plain_want])]
            assert all(job.result(timeout=120) for job in jobs)
        # a generation (inference sessions on the same servers) with each adapter too
        prompt = ids(batch=1, length=4, seed=8)
        for i, model in enumerate(models):
            theirs = peft_reference(llama_checkpoint, tmp_path / str(i))
            want = theirs.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
            assert model.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
    finally:
        for model in [*models, plain]:
            model.shutdown()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_optimizer_steps_upload_each_version_once_and_round_trip(swarm, llama_checkpoint, tmp_path, fused):
    """Each optimizer step's weights reach each server once; a fused step (transformers' Trainer's default
    optimizer) bumps no version counter, and servers kept computing with the first version."""
    local, _ = swarm
    model = with_random_adapter(remote_model(llama_checkpoint, local), seed=9)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused)
        x = ids(seed=10)
        losses = []
        for _ in range(3):
            loss = model(x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert model.swarm.uploads.uploads == 3 * len(CHAIN)  # each version once per server
        with torch.no_grad():
            ours = model(x).logits
        model.save_pretrained(tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(peft_reference(llama_checkpoint, tmp_path)(x).logits, ours, **TOL)
        again = remote_model(llama_checkpoint, local)
        try:
            again.load_adapter(tmp_path)
            with torch.no_grad():
                torch.testing.assert_close(again(x).logits, ours, **TOL)
        finally:
            again.shutdown()
    finally:
        model.shutdown()


def trainer(model, rows, out):
    args = TrainingArguments(
        out,
        per_device_train_batch_size=4,
        num_train_epochs=3,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        activation_checkpointing=True,  # (formerly gradient_checkpointing) as recipes set it: nothing to do
    )
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)


@pytest.mark.parametrize("tuning", ["lora", "peft", "deep_ptune"])
def test_transformers_trainer_trains_through_the_swarm_and_resumes_from_its_checkpoints(
    swarm, llama_checkpoint, tmp_path, tuning, caplog
):
    """transformers' `Trainer` as a user runs it: its default optimizer (a fused AdamW, whose steps the servers
    missed: the loss hardly fell, and the saved adapter was not the one the swarm computed with), a LoRA that
    PEFT then reproduces (`add_adapter`'s, or PEFT's own `get_peft_model`: a Trainer saves and resumes a
    PeftModel as PEFT's folder), and a run resumed from a checkpoint (it found nothing it could load) ending
    with the weights of the run that was not stopped. `activation_checkpointing=True` is accepted (it raised)."""
    local, _ = swarm

    def model():
        options = {"tuning_mode": tuning, "pre_seq_len": 2} if tuning == "deep_ptune" else {}
        made = remote_model(llama_checkpoint, local, **options)
        if tuning == "lora":
            made.add_adapter(peft.LoraConfig(**LORA))
        if tuning == "peft":
            made = peft.get_peft_model(made, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
        return made

    data = ids(batch=8, seed=11)
    rows = [{"input_ids": x, "labels": x} for x in data]
    whole, resumed = model(), model()
    try:
        run = trainer(whole, rows, tmp_path / "run")
        assert "fused" in run.args.optim
        with torch.no_grad():
            before = whole(data, labels=data).loss.item()
        run.train()
        with torch.no_grad():
            assert (
                whole(data, labels=data).loss.item() < before
            )  # (equal when servers kept the first adapter)
        caplog.clear()
        trainer(resumed, rows, tmp_path / "resumed").train(
            resume_from_checkpoint=str(tmp_path / "run/checkpoint-3")
        )
        assert "missing keys" not in caplog.text  # (the head's, which checkpoints never hold)
        ours = dict(whole.named_parameters())
        for name, weight in resumed.named_parameters():
            if weight.requires_grad:
                torch.testing.assert_close(weight, ours[name], **TOL)
        if tuning != "deep_ptune":
            whole.save_pretrained(tmp_path / "adapter")
            x = ids(seed=12)
            with torch.no_grad():
                theirs = peft_reference(llama_checkpoint, tmp_path / "adapter")(x).logits
                torch.testing.assert_close(theirs, whole(x).logits, **TOL)
    finally:
        whole.shutdown()
        resumed.shutdown()


def test_sequence_classification_trains_its_head_and_prompts(swarm, llama_checkpoint):
    local, _ = swarm
    model = remote_model(
        llama_checkpoint,
        local,
        cls=AutoDistributedModelForSequenceClassification,
        tuning_mode="ptune",
        pre_seq_len=2,
        num_labels=2,
    )
    try:
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "ptune.prompts",
            "score.weight",
        }
        model.train()
        x, labels = ids(batch=4, length=5, seed=11), torch.tensor([0, 1, 0, 1])
        mask = torch.ones_like(x)
        mask[1, :2] = 0  # left padding
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        losses = []
        for _ in range(4):
            out = model(x, attention_mask=mask, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
        assert out.logits.shape == (4, 2)
        assert losses[-1] < losses[0]
    finally:
        model.shutdown()


def test_a_classifiers_adapter_is_peft_seq_cls_with_its_head(swarm, llama_checkpoint, tmp_path):
    """A LoRA-tuned classifier saves PEFT's SEQ_CLS folder: its head beside the LoRA, so that PEFT on
    transformers' classifier gives its logits, and `load_adapter` brings both back."""
    from transformers import AutoModelForSequenceClassification

    local, _ = swarm
    config = peft.LoraConfig(task_type="SEQ_CLS", **LORA)

    def classifier():
        model = remote_model(
            llama_checkpoint, local, cls=AutoDistributedModelForSequenceClassification, num_labels=3
        )
        model.add_adapter(config)
        return model

    model, other = classifier(), classifier()
    try:
        assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"score.weight"}
        model.lora.load_tensors(random_lora(model.block_config, model.lora.settings, 5))
        x = ids(batch=1, length=6, seed=3)
        with torch.no_grad():
            ours = model(x).logits
        model.save_pretrained(tmp_path)
        base = AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours, theirs(x).logits, **TOL)
            other.load_adapter(tmp_path)
            torch.testing.assert_close(other(x).logits, ours, **TOL)
    finally:
        model.shutdown()
        other.shutdown()


def test_one_client_serves_five_adapters_in_turn_with_peft_tokens(swarm, llama_checkpoint, tmp_path):
    """`with_adapter`: five adapters over one client's swarm connection, used in turn and then the first two
    again. A server holds 4 of a client's: the fifth took the least recently used one's place (it was refused, and
    the client waited for room that never came), and a session that meets a dropped adapter uploads it again (it
    banned the server). Every generate gives PEFT's tokens on transformers, and nobody is banned."""
    local, _ = swarm
    model = remote_model(llama_checkpoint, local)
    settings = LoraSettings.from_peft(peft.LoraConfig(**LORA))
    folders = []
    for seed in range(5):
        folders.append(tmp_path / f"adapter-{seed}")
        write_peft_adapter(
            folders[-1], settings, random_lora(model.block_config, settings, seed), str(llama_checkpoint)
        )
    x = ids(batch=1, length=5, seed=4)
    try:
        views = [model.with_adapter(folder) for folder in folders]
        want = []
        for folder in folders:
            theirs = peft_reference(llama_checkpoint, folder)
            want.append(theirs.generate(input_ids=x, max_new_tokens=6, do_sample=False).tolist())
        assert len({str(w) for w in want}) > 1  # (the adapters differ in their tokens)
        for i in (0, 1, 2, 3, 4, 0, 1):
            assert views[i].generate(x, max_new_tokens=6, do_sample=False).tolist() == want[i], i
        assert not model.swarm.bans.banned(time.monotonic())
        assert model.swarm.uploads.uploads == 7 * len(CHAIN)  # five, and the two dropped ones again
        views[0].shutdown()  # the swarm connection is the model's
        assert model.generate(x, max_new_tokens=2, do_sample=False).shape == (1, 7)
    finally:
        model.shutdown()


def test_cli_generate_with_a_lora_folder_prints_peft_text(swarm, llama_checkpoint, tmp_path, capsys):
    """`swarmllm generate MODEL --lora DIR` (and `chat`'s): the adapter's greedy text, PEFT's on transformers; a
    folder that is no adapter's is one line before anything loads."""
    from transformers import AutoTokenizer

    from swarmllm.cli import main

    local, _ = swarm
    settings = LoraSettings.from_peft(peft.LoraConfig(**LORA))
    _, config = load_config(llama_checkpoint)
    write_peft_adapter(
        tmp_path / "styled", settings, random_lora(config, settings, 21), str(llama_checkpoint)
    )
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    inputs = tokenizer("the cat", return_tensors="pt")
    theirs = peft_reference(llama_checkpoint, tmp_path / "styled")
    want = tokenizer.decode(
        theirs.generate(**inputs, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True
    )
    plain = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    assert want != tokenizer.decode(plain.generate(**inputs, max_new_tokens=6, do_sample=False)[0])
    args = ["generate", str(llama_checkpoint), "--initial-peers", *local.initial_peers, "--prompt", "the cat"]
    assert main([*args, "--max-new-tokens", "6", "--lora", str(tmp_path / "styled")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == want
    assert main([*args, "--lora", str(tmp_path)]) == 1
    assert f"--lora {tmp_path}: it holds no adapter_config.json" in capsys.readouterr().err


def test_hosted_adapter_routes_only_via_servers_announcing_it(swarm, llama_checkpoint):
    local, hosted = swarm
    model = remote_model(llama_checkpoint, local, chain=False, active_adapter=HOSTED)
    try:
        theirs = peft_reference(llama_checkpoint, hosted)
        x = ids(batch=1, length=5, seed=12)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, theirs(x).logits, **TOL)
        with model.inference_session(max_length=16) as session:
            want = theirs.generate(input_ids=x, max_new_tokens=6, do_sample=False)
            assert model.generate(x, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
            hops = session.session.hops
        servers = {s.peer_id: s for s in run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))}
        assert all(HOSTED in servers[h.peer_id].adapters for h in hops)
        assert sum(HOSTED in s.adapters for s in servers.values()) == 1
    finally:
        model.shutdown()


@pytest.mark.parametrize("codec, bound", [("blockwise8", 0.05)])  # the other codecs: test_compression.py
def test_compressed_states_and_gradients_stay_near_float32(swarm, llama_checkpoint, codec, bound):
    """With the client's `compression`, forwards and backwards carry the states and their gradients in that codec
    both ways: the LoRA and input gradients stay within `bound` (relative L2) of an uncompressed client's, but
    differ from them (the codec was used). A spot check of a compressed forward allows for the codec's error, so
    honest servers agree."""
    local, _ = swarm
    x = ids(seed=15)

    def gradients(**kwargs) -> torch.Tensor:
        model = with_random_adapter(remote_model(llama_checkpoint, local, **kwargs), seed=16)
        try:
            embeds = model.head.embed(x).detach().requires_grad_()
            model(inputs_embeds=embeds, labels=x).loss.backward()
            return torch.cat([embeds.grad.flatten(), *(w.grad.flatten() for w in model.lora.weights)])
        finally:
            model.shutdown()

    plain, compressed = gradients(), gradients(compression=codec)
    error = float((compressed - plain).norm() / plain.norm())
    assert 0 < error < bound, error
    model = remote_model(llama_checkpoint, local, chain=False, compression=codec, spot_check_fraction=1.0)
    try:
        with torch.no_grad():
            model(x)
        checks = model.swarm.spot_checks
        assert checks and all(c.outcome == "agreed" for c in checks), checks
    finally:
        model.shutdown()


def test_backward_survives_a_dead_server(swarm, llama_checkpoint, tmp_path):
    """Last in this module: it kills a chain server (after the forward) and starts it again."""
    local, _ = swarm
    model = with_random_adapter(remote_model(llama_checkpoint, local, chain=False), seed=13)
    try:
        servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))
        by_span = {(s.start_block, s.end_block): s for s in servers}
        model.swarm.use_servers([by_span[span] for span in CHAIN])
        x = ids(seed=14)
        loss = model(x, labels=x).loss
        local.servers[CHAIN.index((1, 3))].kill()
        model.swarm.use_servers(servers)  # the whole-model server may take over now
        loss.backward()
        model.save_pretrained(tmp_path)
        theirs = peft_reference(llama_checkpoint, tmp_path, trainable=True)
        theirs(input_ids=x, labels=x).loss.backward()
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
            layer, rest = name.split(".", 1)
            torch.testing.assert_close(
                weight.grad,
                their_grads[f"base_model.model.model.layers.{layer}.{rest}.default.weight"],
                **TOL,
            )
    finally:
        model.shutdown()
        local.restart_server(CHAIN.index((1, 3)))
