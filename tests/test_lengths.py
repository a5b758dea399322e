"""Generation lengths from the data (eval.max_new_tokens: auto), generations cut off by the
limit (truncated), and the parsing policy for partly well-formed entity lists."""

import json

import pytest
from conftest import MNLI_ROWS

from t2tune.errors import ConfigError
from t2tune.evaluation import evaluate
from t2tune.metrics import entity_metrics
from t2tune.tasks import get_task, read_entities
from t2tune.tokenize import answer_ids, generation_length

SQUAD_ROWS = [
    {"question": "Who?", "context": "Ann met Bob in Paris.", "answers": ["Ann"]},
    {"question": "Where?", "context": "Ann met Bob in Paris.", "answers": ["in the city of Paris"]},
]


def test_auto_length_of_a_label_task_is_the_longest_label(tiny):
    task = get_task("mnli")
    want = max(len(ids) for ids in answer_ids(tiny.tokenizer, task.labels))
    assert want == 3  # " contradiction" is two GPT-J tokens, then EOS
    result = evaluate(tiny.model, tiny.tokenizer, task, MNLI_ROWS[:2])  # max_new_tokens defaults to auto
    assert result.summary(task, "generate")["max_new_tokens"] == want


def test_auto_length_of_free_text_comes_from_training_targets(tiny):
    task = get_task("squad")
    rows = [task.prepare(r) for r in SQUAD_ROWS]
    # "in the city of Paris" + EOS = 6 tokens; margin max(4, 6/4) = 4
    assert generation_length(task, tiny.tokenizer, ["Ann", "in the city of Paris"], 512, 20) == 10
    result = evaluate(tiny.model, tiny.tokenizer, task, rows, targets=["Ann", "a b c d e f g h i j k l"])
    assert result.metrics["max_new_tokens"] == 13 + 4  # the training targets, not the rows', decide
    result = evaluate(tiny.model, tiny.tokenizer, task, rows)  # no training data: the rows' references
    assert result.metrics["max_new_tokens"] == 10


def test_auto_length_without_answers_asks_for_a_number(tiny):
    with pytest.raises(ConfigError, match=r"give a number \(--max-new-tokens N\)"):
        evaluate(
            tiny.model, tiny.tokenizer, get_task("squad"), [{"question": "Who?", "context": "Ann."}], with_metrics=False
        )


def test_truncated_generations_are_counted_and_warned_once(tiny, capsys):
    """The random tiny model never says EOS within one token: every row is truncated."""
    task = get_task("mnli")
    result = evaluate(tiny.model, tiny.tokenizer, task, MNLI_ROWS, max_new_tokens=1, batch_size=2)
    summary = result.summary(task, "generate")
    assert summary["truncated"] == 6 and summary["max_new_tokens"] == 1 and summary["invalid"] == 6
    assert all(r["truncated"] for r in result.records)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "6 of 6 generations reached max_new_tokens=1" in warnings[0]
    assert "eval.max_new_tokens (--max-new-tokens)" in warnings[0]


def test_entity_parsing_policy_on_a_cut_off_list():
    cut = "PER: Marcello Cuttitta; LOC: Rome; PER"  # generation stopped mid-list
    gold = "PER: Marcello Cuttitta; LOC: Rome; PER: Ann"
    assert read_entities(cut, "lenient") == ([("PER", "Marcello Cuttitta"), ("LOC", "Rome")], False)
    assert read_entities(cut, "strict") == ([], False)
    lenient = entity_metrics([cut], [gold], "lenient")
    strict = entity_metrics([cut], [gold], "strict")
    assert lenient["malformed"] == strict["malformed"] == 1
    assert lenient["precision"] == 1.0 and lenient["recall"] == pytest.approx(2 / 3)
    assert strict["precision"] == 0.0 and strict["recall"] == 0.0
    assert entity_metrics(["PER: Ann; LOC: Rome"], [gold], "strict")["malformed"] == 0


def test_cli_auto_length_and_policy_flags(tmp_path, capsys):
    from t2tune.cli import main

    rows = [{"tokens": ["EU", "rejects", "German", "call"], "ner_tags": ["B-ORG", "O", "B-MISC", "O"]}]
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(
        [
            "evaluate",
            "tiny-gptj",
            "--task",
            "conll2003",
            "--data",
            str(tmp_path / "ner.jsonl"),
            "--entity-parsing",
            "strict",
        ]
    )
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["max_new_tokens"] > 0 and "truncated" in summary
    code = main(
        [
            "predict",
            "tiny-gptj",
            "--task",
            "conll2003",
            "--input",
            str(tmp_path / "ner.jsonl"),
            "--out",
            str(tmp_path / "p.jsonl"),
        ]
    )
    assert code == 0  # labelled input rows: auto measures their entities
    (tmp_path / "bare.jsonl").write_text(json.dumps({"tokens": ["EU", "rejects"]}) + "\n")
    code = main(
        [
            "predict",
            "tiny-gptj",
            "--task",
            "conll2003",
            "--input",
            str(tmp_path / "bare.jsonl"),
            "--out",
            str(tmp_path / "q.jsonl"),
        ]
    )
    assert code == 2 and "give a number (--max-new-tokens N)" in capsys.readouterr().err
