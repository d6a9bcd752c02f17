"""LoRA fine-tuning through peft, and TensorBoard logging: what trains, what a checkpoint holds, resume."""

import json

import pytest
import torch

from mamba2 import checkpoints, lora
from mamba2.data import load_corpus
from mamba2.errors import UserError
from mamba2.metrics import MetricsLog
from mamba2.models import Mamba2Config, Mamba2LM
from mamba2.tokenizer import ByteTokenizer
from mamba2.train_config import TrainConfig
from mamba2.training import Trainer

pytest.importorskip("peft", reason="LoRA tests need peft (in the test extra)")

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus(None, TOK)


def pretrained(seed=0):
    """A tiny model with random weights standing in for a released one (saved state copied, so it stays put)."""
    torch.manual_seed(seed)
    config = Mamba2Config.preset("tiny")
    model = Mamba2LM(config)
    return model, config, {k: v.clone() for k, v in model.state_dict().items()}


def run(**kw):
    base = dict(steps=6, batch_size=2, seq_len=64, warmup=1, lr=1e-2, eval_every=0, eval_tokens=256, lora_rank=4)
    return TrainConfig(**{**base, **kw})


def quiet(**kw):
    return dict(progress=False, log=lambda m: None, **kw)


def test_only_the_adapters_train_and_the_merged_weights_add_exactly_their_product(stdlib):
    train, val = stdlib
    model, config, before = pretrained()
    trainer = Trainer(model, config, TOK, train, val, run(), device="cpu", **quiet())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".mixer.")[1].split(".")[0] for n in trainable} == {"in_proj", "out_proj"}
    trainer.fit()
    inner = trainer.model.get_base_model().state_dict()
    for key, value in before.items():       # every original weight, targeted or not, is bit-identical
        wrapped = key.replace("in_proj.weight", "in_proj.base_layer.weight").replace(
            "out_proj.weight", "out_proj.base_layer.weight")
        assert torch.equal(inner[wrapped], value), key
    merged = trainer.plain_model().state_dict()
    assert type(trainer.plain_model()) is Mamba2LM and set(merged) == set(before)
    for key, value in before.items():
        if key.endswith(("in_proj.weight", "out_proj.weight")):
            prefix = key.removesuffix(".weight")
            a, b = inner[f"{prefix}.lora_A.default.weight"], inner[f"{prefix}.lora_B.default.weight"]
            expected = value + (8 / 4) * b @ a           # alpha defaults to 2 x rank
            assert b.abs().max() > 0
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[key], value), key
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(trainer.plain_model()(ids), trainer.model(ids), rtol=1e-5, atol=1e-5)


def test_fine_tuning_with_adapters_lowers_the_held_out_loss(stdlib):
    train, val = stdlib
    model, config, _ = pretrained()
    trainer = Trainer(model, config, TOK, train, val, run(steps=12, lr=2e-2, eval_every=12), device="cpu", **quiet())
    trainer.fit()
    assert trainer.eval_history[-1][1] < trainer.eval_history[0][1] - 0.05


def test_a_resumed_adapter_run_reaches_the_uninterrupted_weights(stdlib, tmp_path):
    """The checkpoint holds merged weights + the adapter; a resume takes the product back out (float32 rounding)."""
    train, val = stdlib
    model, config, _ = pretrained()
    whole = Trainer(model, config, TOK, train, val, run(), device="cpu", **quiet())
    whole.fit()
    model, config, _ = pretrained()
    first = Trainer(model, config, TOK, train, val, run(), device="cpu", out_dir=tmp_path / "ck", **quiet())
    first.fit(until_step=3)
    model, config, tok, state = checkpoints.load(tmp_path / "ck")
    assert "adapter" in state and not any(".lora_" in k for k in model.state_dict())
    second = Trainer(model, config, tok, train, val, run(), device="cpu", out_dir=tmp_path / "ck", state=state,
                     **quiet())
    second.fit()
    a, b = whole.plain_model().state_dict(), second.plain_model().state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [x for _, x in second.train_history] == pytest.approx([x for _, x in whole.train_history], rel=1e-5)


def test_adapter_saved_alone_loads_in_peft_over_the_starting_model(stdlib, tmp_path):
    from peft import PeftModel

    train, val = stdlib
    model, config, before = pretrained()
    trainer = Trainer(model, config, TOK, train, val, run(steps=3, save_adapter=True), device="cpu",
                      out_dir=tmp_path / "ck", **quiet())
    trainer.fit()
    assert (tmp_path / "ck" / "adapter" / "adapter_model.safetensors").is_file()
    base = Mamba2LM.from_state_dict(config, before)
    adapted = PeftModel.from_pretrained(base, tmp_path / "ck" / "adapter").eval()
    merged = checkpoints.load(tmp_path / "ck")[0].eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids), merged(ids), rtol=1e-5, atol=1e-5)


def test_bad_adapter_settings_are_refused_with_what_would_work(stdlib):
    train, val = stdlib
    model, config, _ = pretrained()
    with pytest.raises(UserError, match=r"nope names no linear layer.*in_proj.*out_proj"):
        Trainer(model, config, TOK, train, val, run(lora_targets=("in_proj", "nope")), device="cpu", **quiet())
    with pytest.raises(UserError, match="save_adapter.*--lora-rank"):
        TrainConfig(save_adapter=True)
    with pytest.raises(UserError, match="lora_dropout"):
        TrainConfig(lora_rank=2, lora_dropout=1.0)
    model, config, _ = pretrained()
    state = {"step": 1, "micro_step": 1, "train_config": run().to_dict()}
    with pytest.raises(UserError, match="cannot be added when resuming"):
        Trainer(model, config, TOK, train, val, run(), device="cpu", state=state, **quiet())
    assert "lm_head" in lora.linear_names(model)
    model, config, _ = pretrained()       # tied to the embedding: a merged adapter there would be lost
    with pytest.raises(UserError, match="lm_head shares its weight with another layer"):
        Trainer(model, config, TOK, train, val, run(lora_targets=("lm_head",)), device="cpu", **quiet())
    model, config, _ = pretrained()
    with pytest.raises(UserError, match="--lora-rank 65 exceeds the narrowest targeted layer's width 64"):
        Trainer(model, config, TOK, train, val, run(lora_rank=65), device="cpu", **quiet())


def test_tensorboard_gets_the_metrics_log_and_a_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(tag):
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]

    log = MetricsLog(tmp_path / "ck", tensorboard=tmp_path / "tb")
    for step in range(1, 5):
        log.add(step=step, train_loss=10.0 - step, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0, elapsed_s=1.0)
    log.add(step=4, eval_loss=7.5, perplexity=1808.0, bits_per_byte=2.0, eval_tokens=256)
    log.close()
    assert scalars("train/loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert scalars("eval/loss") == [(4, 7.5)] and scalars("train/tokens_per_s")[0] == (1, 100.0)
    (tmp_path / "ck").mkdir()
    resumed = MetricsLog(tmp_path / "ck", resume_step=2, tensorboard=tmp_path / "tb")
    resumed.add(step=3, train_loss=0.25, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0, elapsed_s=1.0)
    resumed.close()
    assert scalars("train/loss") == [(1, 9.0), (2, 8.0), (3, 0.25)]
    assert json.loads((tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] == 0.25
