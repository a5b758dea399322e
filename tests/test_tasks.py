import pytest

from t2tune.errors import ConfigError
from t2tune.tasks import (
    INVALID,
    entities_from_iob2,
    get_task,
    parse_entities,
    render_entities,
)


def test_mnli_prompt_is_byte_exact():
    task = get_task("mnli")
    row = {"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "label": "entailment"}
    assert task.train_text(row, "<|endoftext|>") == (
        "mnli hypothesis: A cat is sitting. premise: The cat sat on the mat. target: entailment<|endoftext|>"
    )
    assert task.prompt_text(row) == "mnli hypothesis: A cat is sitting. premise: The cat sat on the mat. target:"


@pytest.mark.parametrize(
    "generated,expected",
    [
        ("entailment", "entailment"),
        (" entailment<|endoftext|>", "entailment"),
        (" neutral \n<|endoftext|><|endoftext|>", "neutral"),
        (" contradiction<|endoftext|>neutral", "contradiction"),
        (" entailment because the premise", INVALID),
        ("", INVALID),
        ("<|endoftext|>", INVALID),
        (" Entailment<|endoftext|>", INVALID),  # labels must match exactly, as in the reference
    ],
)
def test_postprocess(generated, expected):
    assert get_task("mnli").postprocess(generated, "<|endoftext|>") == expected


def test_free_text_postprocess_keeps_text():
    assert get_task("squad").postprocess(" Denver Broncos<|im_end|>x", "<|im_end|>") == "Denver Broncos"


def test_entities_round_trip():
    tokens = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    ents = entities_from_iob2(tokens, tags)
    assert ents == [("ORG", "EU"), ("MISC", "German"), ("MISC", "British")]
    text = render_entities(ents)
    assert text == "ORG: EU; MISC: German; MISC: British"
    assert parse_entities(text) == ents
    assert render_entities([]) == "none" and parse_entities("none") == []
    assert parse_entities("FOO: x") is None and parse_entities("PER:") is None


def test_adjacent_same_type_entities_split_on_b_tag():
    assert entities_from_iob2(["A", "B", "C"], ["B-PER", "B-PER", "I-PER"]) == [("PER", "A"), ("PER", "B C")]


def test_custom_task_yaml(tmp_path):
    path = tmp_path / "boolq.yaml"
    path.write_text(
        'name: boolq\nprompt: "boolq question: {question} passage: {passage} target:"\nlabels: ["yes", "no"]\n'
    )
    task = get_task(str(path))
    assert task.labels == ("yes", "no") and task.input_fields == ["question", "passage"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: no placeholders\nmetric: bleu\ncolour: red\n")
    with pytest.raises(ConfigError) as err:
        get_task(str(bad))
    assert "unknown key 'colour'" in str(err.value) and "'metric' must be" in str(err.value)


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'mnlii'"):
        get_task("mnlii")
