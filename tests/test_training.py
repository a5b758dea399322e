import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from t2tune.api import Trainer
from t2tune.config import ModelConfig
from t2tune.data import load_examples
from t2tune.loss import LossModule
from t2tune.models import decoder_and_head, load_model
from t2tune.packing import collate, pack
from t2tune.runfolder import RunFolder
from t2tune.tasks import get_task
from t2tune.tokenize import Encoded
from t2tune.training import TrainState, epoch_order, next_positions

pytestmark = pytest.mark.slow  # trains tiny models end to end


def _token_losses(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits[0].float(), batch["labels"][0], reduction="none", ignore_index=-100)


@pytest.mark.parametrize(
    "name,attn", [("tiny-gptj", "eager"), ("tiny-gptj", "sdpa"), ("smollm2-135m", "sdpa"), ("smollm2-135m", "eager")]
)
def test_isolated_packing_really_isolates(name, attn):
    loaded = load_model(ModelConfig(name=name, attn_implementation=attn))
    examples = [
        Encoded([101, 102, 103, 104, 105, 106], 3),
        Encoded([201, 202, 203, 204], 2),
        Encoded([301, 302, 303, 304, 305], 1),
    ]
    packed = collate(pack(examples, "isolated", 20, "all", pad_id=0), pad_id=0)
    together = _token_losses(loaded.model, packed)
    start = 0
    for example in examples:
        alone = collate(pack([example], "none", 20, "all", pad_id=0), pad_id=0)
        expected = _token_losses(loaded.model, alone)
        n = len(example.ids) - 1
        got = together[start : start + n]
        assert torch.allclose(got, expected[:n], atol=1e-5, rtol=1e-5), (name, attn, got, expected)
        start += len(example.ids)


def test_fast_loss_path_equals_full_logits(tiny):
    rows = pack([Encoded(list(range(300, 340)), 30), Encoded(list(range(500, 520)), 5)], "isolated", 63, "target", 0)
    batch = collate(rows, 0)
    module = LossModule(tiny.model)
    assert decoder_and_head(tiny.model) is not None  # the fast path is taken
    with torch.no_grad():
        fast = module(**batch)
        logits = tiny.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    full = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum", ignore_index=-100)
    assert torch.allclose(fast, full, rtol=1e-5)


@pytest.mark.parametrize("loss_on", ["all", "target"])
def test_fused_output_layer_and_loss_match_autograd(tiny, loss_on, monkeypatch):
    """The fused, chunked output layer + cross-entropy gives the loss and every parameter's
    gradient of the plain expression (GPT-J's output layer has a bias, so that path is covered)."""
    import t2tune.linear_ce as linear_ce

    rows = pack([Encoded(list(range(300, 340)), 30), Encoded(list(range(500, 520)), 5)], "isolated", 63, loss_on, 0)
    batch = collate(rows, 0)
    model = tiny.model
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    plain = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum", ignore_index=-100)
    expected = torch.autograd.grad(plain, params)
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # several chunks, last ragged
    fused = LossModule(model)(**batch)
    got = torch.autograd.grad(fused, params)
    assert model.get_output_embeddings().bias is not None
    assert torch.allclose(fused, plain, rtol=1e-5)
    for p, g, e in zip(params, got, expected):  # fp32, only the summation order differs
        name = [n for n, q in model.named_parameters() if q is p]
        assert (g - e).abs().max() <= 2e-5 * e.abs().max() + 1e-8, (name, (g - e).abs().max(), e.abs().max())


def test_schedule_and_data_order():
    state = TrainState()
    seen = [i for _ in range(2) for _, i in next_positions(lambda epoch: 5, state, 4, seed=1)]
    assert seen[:5] == epoch_order(5, 1, 0) and seen[5:] == epoch_order(5, 1, 1)[:3]
    assert (state.epoch, state.row_in_epoch) == (1, 3)


def _train(cfg, data, loaded=None):
    loaded = loaded or load_model(cfg.model)
    task = get_task(cfg.task)
    rows = load_examples(task, str(data), "train")
    val = load_examples(task, str(data), "validation")
    trainer = Trainer(cfg, loaded.model, rows, val, cfg.eval, loaded.tokenizer, task=task)
    trainer.train()
    return trainer


def test_every_trainable_parameter_changes(tmp_path, mnli_dir):
    cfg = tiny_config(tmp_path / "run", mnli_dir, **{"train.steps": 2, "checkpoint.every": 0})
    loaded = load_model(cfg.model)
    before = {k: v.detach().clone() for k, v in loaded.model.named_parameters()}
    _train(cfg, mnli_dir, loaded)
    for name, param in loaded.model.named_parameters():
        assert not torch.equal(before[name], param.detach()), f"{name} did not change"


def test_train_stop_resume_export_reload(tmp_path, mnli_dir):
    """3 steps uninterrupted vs 2 steps + resume to 3: same weights; export reloads with same logits."""
    last = {"export.from": "last"}  # the last step's weights, whichever validation was best
    straight = _train(tiny_config(tmp_path / "a", mnli_dir, **{"train.steps": 3}, **last), mnli_dir)
    _train(tiny_config(tmp_path / "b", mnli_dir, **{"train.steps": 2}, **last), mnli_dir)
    assert [s for s, _ in RunFolder(tmp_path / "b").checkpoints()] == [1, 2]
    resumed = _train(tiny_config(tmp_path / "b", mnli_dir, **{"train.steps": 3}, **last), mnli_dir)
    assert resumed.state.optimizer_step == 3
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    # metrics.jsonl: one train line per step, no duplicates after the resume
    import json

    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e["event"] == "train"] == [1, 2, 3]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(lines[1])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "hf")
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    resumed.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, resumed.model(ids).logits, atol=1e-6)
    assert (tmp_path / "b" / "hf" / "README.md").read_text().count("mnli hypothesis: <hypothesis>") >= 1
    assert (tmp_path / "b" / "plots" / "loss_lr.png").is_file()


@pytest.mark.parametrize("name", ["tiny-gptj", "smollm2-135m"])
def test_lora_trains_adapters_and_merged_export_matches(tmp_path, mnli_dir, name):
    cfg = tiny_config(
        tmp_path / "lora", mnli_dir, **{"train.method": "lora", "train.steps": 2, "lora.r": 4, "model.name": name}
    )
    trainer = _train(cfg, mnli_dir)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "hf")
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    trainer.model.eval()
    with torch.no_grad():
        live = trainer.model(ids).logits
        # the export gate's fp32 tolerance: 30 layers of SmolLM2 move fp32 rounding past 1e-5
        assert (merged(ids).logits - live).abs().max() <= 1e-4 * live.abs().max()
    # the step checkpoint holds only the adapter, and evaluates/exports through the same loader
    adapter = load_model(ModelConfig(name=str(tmp_path / "lora" / "checkpoints" / "step-2")))
    with torch.no_grad():
        assert torch.allclose(adapter.model(ids).logits, trainer.model(ids).logits, atol=1e-5)


def test_a_pretrained_model_trains_in_training_mode(tmp_path, mnli_dir):
    """from_pretrained hands models over in eval mode, which turns dropout off: training must
    switch it on (and validation, in eval mode, must hand it back in training mode)."""
    tiny = load_model(ModelConfig(name="tiny-gptj"))
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_model(ModelConfig(name=str(tmp_path / "model")))
    assert not loaded.model.training
    seen: list[bool] = []
    loaded.model.transformer.h[0].register_forward_hook(
        lambda module, args, out: seen.append(module.training) if torch.is_grad_enabled() else None
    )
    cfg = tiny_config(
        tmp_path / "run",
        mnli_dir,
        **{
            "model.name": str(tmp_path / "model"),
            "train.steps": 2,
            "train.dropout": 0.1,
            "eval.every": 1,
            "checkpoint.every": 0,
        },
    )
    _train(cfg, mnli_dir, loaded)
    assert len(seen) == 2 * 2 and all(seen)  # 2 steps of 2 micro-batches, the second after a validation


def test_lora_with_dropout_resumes_exactly(tmp_path, mnli_dir):
    """LoRA's dropout draws from the global RNG (which the checkpoint restores): nothing else may
    draw from it, or a resumed run's masks move (the MFU peak's probe once did, at 6B)."""
    same = {"train.method": "lora", "lora.r": 4, "lora.dropout": 0.2, "export.from": "last"}
    straight = _train(tiny_config(tmp_path / "a", mnli_dir, **{"train.steps": 3}, **same), mnli_dir)
    _train(tiny_config(tmp_path / "b", mnli_dir, **{"train.steps": 2}, **same), mnli_dir)
    resumed = _train(tiny_config(tmp_path / "b", mnli_dir, **{"train.steps": 3}, **same), mnli_dir)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_gives_the_same_loss(tmp_path, mnli_dir):
    _train(tiny_config(tmp_path / "a", mnli_dir, **{"train.steps": 2, "checkpoint.every": 0}), mnli_dir)
    _train(
        tiny_config(
            tmp_path / "b", mnli_dir, **{"train.steps": 2, "checkpoint.every": 0, "train.gradient_checkpointing": True}
        ),
        mnli_dir,
    )
    import json

    la = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in la if e["event"] == "train"] == pytest.approx(
        [e["loss"] for e in lb if e["event"] == "train"], rel=1e-5
    )


def test_compiled_training_equals_eager_and_resumes(tmp_path, mnli_dir):
    """train.compile over isolated packing (position-id restarts), the fused output layer and loss,
    gradient checkpointing and LoRA: the eager run's losses within 1e-5 in fp32, and a compiled
    run stopped at step 2 and resumed continues as the eager one did."""
    import json

    same = {
        "train.steps": 3,
        "train.packing": "isolated",
        "train.loss_on": "target",
        "train.method": "lora",
        "train.gradient_checkpointing": True,
        "export.from": "last",
        "checkpoint.every": 1,
    }
    eager = _train(tiny_config(tmp_path / "eager", mnli_dir, **same), mnli_dir)
    stopped = _train(
        tiny_config(tmp_path / "compiled", mnli_dir, **{**same, "train.compile": True, "train.steps": 2}), mnli_dir
    )
    assert stopped.run.parts.loss_module._compiled  # it really ran compiled
    resumed = _train(tiny_config(tmp_path / "compiled", mnli_dir, **{**same, "train.compile": True}), mnli_dir)

    def losses(out):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in lines if e["event"] == "train"]

    assert len(losses(tmp_path / "eager")) == 3
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    # weights: Adam turns fp32 rounding in near-zero gradients into whole-lr steps, so the two
    # runs are compared by how far apart they ended against how far training moved them
    start = dict(load_model(tiny_config(tmp_path / "x", mnli_dir).model).model.named_parameters())
    apart = moved = 0.0
    for (name, a), (_, b) in zip(eager.model.named_parameters(), resumed.model.named_parameters()):
        apart += float((a - b).pow(2).sum())
        base = start.get(name.replace("base_model.model.", "").replace(".base_layer", ""))
        if base is None and "lora_B" in name:
            base = torch.zeros_like(a)  # LoRA's B starts at zero (A's start is not at hand)
        moved += float((a - base).pow(2).sum()) if base is not None else 0.0
    print(f"compiled vs eager: {apart**0.5:.3g} apart, {moved**0.5:.3g} moved")
    assert apart**0.5 < 1e-2 * moved**0.5


def test_trainer_api_with_custom_metric_and_postprocess(tmp_path, mnli_dir):
    """The reference's signature: Trainer(config, pretrained, dataset, eval_dataset, eval_config,
    tokenizer, metric, postprocess)."""
    from t2tune.config import EvalConfig

    cfg = tiny_config(tmp_path / "api", mnli_dir, **{"train.steps": 1, "checkpoint.every": 0})
    task = get_task("mnli")
    rows = load_examples(task, str(mnli_dir), "train")
    val = load_examples(task, str(mnli_dir), "validation")
    seen = []

    def metric(predictions, references):
        seen.append((list(predictions), list(references)))
        return {"always_neutral": sum(p == "neutral" for p in predictions) / len(predictions)}

    tiny = load_model(cfg.model)  # not the shared fixture: this trains it
    trainer = Trainer(
        cfg,
        tiny.model,
        rows,
        val,
        EvalConfig(max_new_tokens=2, batch_size=3),
        tiny.tokenizer,
        metric,
        lambda text: "neutral",
    )
    result = trainer.evaluate()
    assert result.metrics == {"always_neutral": 1.0}
    assert seen[0][1] == [[r["label"]] for r in val]
    trainer.save_hf_checkpoint(tmp_path / "export")
    assert (tmp_path / "export" / "config.json").is_file() and (tmp_path / "export" / "README.md").is_file()


def test_max_minutes_stops_and_still_exports(tmp_path, mnli_dir):
    cfg = tiny_config(
        tmp_path / "t", mnli_dir, **{"train.steps": 1000, "train.max_minutes": 1e-9, "checkpoint.every": 0}
    )
    trainer = _train(cfg, mnli_dir)
    assert trainer.state.optimizer_step == 1  # the first step already passes the limit
    assert (tmp_path / "t" / "hf" / "config.json").is_file()
    assert [s for s, _ in RunFolder(tmp_path / "t").checkpoints()] == [1]
