import json

import pytest
import torch
from conftest import MNLI_ROWS, SHARED_DATA

from t2tune.data import read_jsonl
from t2tune.evaluation import evaluate, score_labels
from t2tune.metrics import entity_metrics, label_metrics, squad_metrics, squad_scores
from t2tune.tasks import INVALID, Task, get_task
from t2tune.tokenize import answer_ids


def _plain_generate(loaded, prompts, max_new_tokens=5, batch_size=4):
    """The baseline users would write: batches in dataset order, left padding, HF generate."""
    tok = loaded.tokenizer
    tok.padding_side = "left"
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = tok(prompts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = loaded.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            out.append(tok.decode(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row))
    return out


def _mnli_rows(n):
    path = SHARED_DATA / "mnli" / "validation.jsonl"
    rows = read_jsonl(path)[:n] if path.is_file() else (MNLI_ROWS * 4)[:n]
    return rows


@pytest.mark.slow  # the real SmolLM2-135M
@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_generate_mode_matches_plain_generate(which, request):
    loaded = request.getfixturevalue(which)
    task = get_task("mnli")
    rows = _mnli_rows(12)
    result = evaluate(loaded.model, loaded.tokenizer, task, rows, mode="generate", max_new_tokens=5, batch_size=5)
    expected = _plain_generate(loaded, [task.prompt_text(r) for r in rows])
    assert [r["generated"] for r in result.records] == expected
    assert [r["prediction"] for r in result.records] == [task.postprocess(t, loaded.eos_text) for t in expected]


def test_score_mode_equals_separate_forward_passes(tiny):
    """Prompt sharing is exact, and whole-label likelihood decides where first tokens tie."""
    task = Task(name="city", prompt="city: {q} target:", labels=("new york", "new jersey", "boston"))
    tok = tiny.tokenizer
    prompts = [tok(f"city: {q} target:", add_special_tokens=False)["input_ids"] for q in ["a b", "c", "d e f g"]]
    conts = answer_ids(tok, task.labels)
    assert conts[0][0] == conts[1][0]  # " new" is the first token of two labels
    scores = score_labels(tiny.model, tok, prompts, task.labels, batch_size=2)
    for prompt, got in zip(prompts, scores):
        for cont, value in zip(conts, got):
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
            want = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont))
            assert abs(value - want) < 1e-3, (value, want)
        assert got[0] != got[1]
    rows = [{"q": q, "label": "boston"} for q in ["a b", "c", "d e f g"]]
    result = evaluate(tiny.model, tok, task, rows, mode="score", batch_size=2)
    for record, got in zip(result.records, scores):
        assert record["prediction"] == task.labels[max(range(3), key=got.__getitem__)]
        assert set(record["scores"]) == set(task.labels)
    assert result.metrics["invalid"] == 0


@pytest.mark.slow  # the real SmolLM2-135M
@pytest.mark.parametrize("mode", ["generate", "score"])
def test_bf16_checked_redoes_close_calls_in_fp32(smollm, mode, monkeypatch):
    """With every call counted as close, bf16-checked is fp32 row for row; with none, it is bf16."""
    import t2tune.evaluation as ev

    task, rows = get_task("mnli"), _mnli_rows(10)
    field = "generated" if mode == "generate" else "scores"

    def run(precision):
        result = evaluate(
            smollm.model, smollm.tokenizer, task, rows, mode=mode, max_new_tokens=4, batch_size=4, precision=precision
        )
        return [r[field] for r in result.records], result.metrics.get("rechecked_fp32")

    fp32, none = run("fp32")
    bf16, _ = run("bf16")
    assert none is None and fp32 != bf16  # the test is blind if the two precisions agree exactly
    monkeypatch.setattr(ev, "CHECK_MARGIN", float("inf"))
    assert run("bf16-checked") == (fp32, len(rows))
    monkeypatch.setattr(ev, "CHECK_MARGIN", 0.0)
    assert run("bf16-checked") == (bf16, 0)


def test_bf16_checked_needs_fp32_weights(tiny):
    import copy

    from t2tune.errors import ConfigError

    half = copy.deepcopy(tiny.model).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="bf16-checked"):
        evaluate(half, tiny.tokenizer, get_task("mnli"), MNLI_ROWS[:2], precision="bf16-checked")


def test_summary_fields(tiny):
    task = get_task("mnli")
    result = evaluate(tiny.model, tiny.tokenizer, task, MNLI_ROWS, max_new_tokens=2, batch_size=4)
    summary = result.summary(task, "generate")
    assert {"task", "n", "accuracy", "invalid", "examples_per_s", "mode", "macro_f1"} <= set(summary)
    assert summary["n"] == 6 and summary["mode"] == "generate"
    json.dumps(summary)
    assert {"premise", "hypothesis", "generated", "prediction", "label"} <= set(result.records[0])


def test_label_metrics_worked_example():
    task = get_task("rte")
    m = label_metrics(
        task,
        ["entailment", INVALID, "not_entailment", "entailment"],
        ["entailment", "entailment", "not_entailment", "not_entailment"],
    )
    assert m["accuracy"] == 0.5 and m["invalid"] == 1
    assert m["confusion"] == {"labels": ["entailment", "not_entailment", None], "matrix": [[1, 0, 1], [1, 1, 0]]}
    assert m["per_class"]["entailment"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert m["f1"] == pytest.approx(2 / 3)  # positive class not_entailment: P = 1, R = 0.5


def test_squad_metrics_worked_examples():
    assert squad_scores("The Eiffel Tower.", ["eiffel tower"]) == (1.0, 1.0)
    assert squad_scores("an apple", ["the apple", "pear"]) == (1.0, 1.0)
    assert squad_scores("red car", ["the big red car"]) == (0.0, 0.8)
    assert squad_scores("", ["x"]) == (0.0, 0.0)
    m = squad_metrics(["Denver Broncos", "Carolina"], [["Denver Broncos"], ["Carolina Panthers"]])
    assert m["exact_match"] == 0.5 and m["f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_entity_metrics_worked_example():
    m = entity_metrics(
        ["PER: John Smith; LOC: Paris", "ORG: Paris", "garbage text", "none"],
        ["PER: John Smith; LOC: Paris", "LOC: Paris", "PER: Ann", "none"],
    )
    # predicted 3 (2 right), gold 4 entities, one malformed generation
    assert m["malformed"] == 1
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["per_type"]["ORG"]["precision"] == 0.0 and m["per_type"]["PER"]["recall"] == 0.5


def test_score_mode_refuses_free_text(tiny):
    from t2tune.errors import ConfigError

    with pytest.raises(ConfigError, match="score mode needs a label task"):
        evaluate(tiny.model, tiny.tokenizer, get_task("squad"), [], mode="score")
