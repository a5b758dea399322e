import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from t2tune.errors import DataError
from t2tune.packing import IGNORE_INDEX, collate, pack
from t2tune.tasks import get_task
from t2tune.tokenize import Encoded, encode_examples, encode_for_training

# two examples: prompt tokens then target tokens (9 = EOS)
A = Encoded([1, 2, 3, 4, 9], 3)  # prompt 1 2 3, target 4 9
B = Encoded([5, 6, 9], 2)  # prompt 5 6, target 9


def rows_of(mode, seq_len, loss_on):
    rows = pack([A, B], mode, seq_len, loss_on, pad_id=0)
    return [(r.tokens.tolist(), r.positions.tolist(), r.loss_mask.tolist()) for r in rows]


def test_concat_all_tokens():
    # stream 1 2 3 4 9 5 6 9, rows of seq_len + 1 = 4 tokens, ragged tail dropped
    assert rows_of("concat", 3, "all") == [
        ([1, 2, 3, 4], [0, 1, 2], [True, True, True]),
        ([9, 5, 6, 9], [0, 1, 2], [True, True, True]),
    ]


def test_concat_target_only():
    # label of position t is token t+1; it counts only when that token is a target token
    assert rows_of("concat", 3, "target") == [
        ([1, 2, 3, 4], [0, 1, 2], [False, False, True]),
        ([9, 5, 6, 9], [0, 1, 2], [False, False, True]),
    ]


def test_isolated_rows():
    assert rows_of("isolated", 9, "all") == [
        (
            [1, 2, 3, 4, 9, 5, 6, 9, 0, 0],
            [0, 1, 2, 3, 4, 0, 1, 2, 0],
            [True, True, True, True, False, True, True, False, False],
        ),
    ]
    assert rows_of("isolated", 9, "target")[0][2] == [False, False, True, True, False, False, True, False, False]


def test_isolated_first_fit():
    rows = pack([A, Encoded([7] * 5, 4), B], "isolated", 7, "all", pad_id=0)
    assert [r.tokens.tolist() for r in rows] == [[1, 2, 3, 4, 9, 5, 6, 9], [7, 7, 7, 7, 7, 0, 0, 0]]


def test_none_mode_and_collate_pads_right():
    rows = pack([A, B], "none", 8, "target", pad_id=0)
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 4, 9],
        [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_label_shift():
    batch = collate(pack([A], "isolated", 4, "all", pad_id=0), pad_id=0)
    # inputs = row[:-1], labels = row[1:]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[2, 3, 4, 9]]


def test_too_long_is_an_error(tiny):
    task = get_task("mnli")
    row = {"premise": "word " * 100, "hypothesis": "h", "label": "neutral", "_where": "f.jsonl:3"}
    with pytest.raises(DataError, match=r"f.jsonl:3: example is \d+ tokens, longer than a training row"):
        encode_for_training(task, [row], tiny.tokenizer, 32, truncate=False)
    # a task without a field to shorten: the prompt's tokens are cut to fill the row exactly
    plain = dataclasses.replace(task, truncate_field=None)
    (example,), dropped = encode_for_training(plain, [row], tiny.tokenizer, 32, truncate=True)
    assert len(example.ids) == 33 and dropped == 0
    assert tiny.tokenizer.decode(example.ids).endswith("target: neutral<|endoftext|>")
    # MNLI names its premise: the premise is shortened (as text), hypothesis and answer stay whole
    (example,), dropped = encode_for_training(task, [row], tiny.tokenizer, 32, truncate=True)
    text = tiny.tokenizer.decode(example.ids)
    assert len(example.ids) <= 33 and dropped == 0 and text.startswith("mnli hypothesis: h premise: word")
    assert text.endswith("target: neutral<|endoftext|>")


def test_qa_truncation_drops_examples_whose_answer_is_cut(tiny):
    task = get_task("squad")
    near = task.prepare({"question": "q?", "context": "Paris is the answer. " + "filler " * 80, "answers": ["Paris"]})
    far = task.prepare({"question": "q?", "context": "filler " * 80 + "Lyon.", "answers": ["Lyon"]})
    out, dropped = encode_for_training(task, [near, far], tiny.tokenizer, 40, truncate=True)
    assert dropped == 1 and len(out) == 1 and len(out[0].ids) <= 41
    assert tiny.tokenizer.decode(out[0].ids).endswith("target: Paris<|endoftext|>")


def test_encode_matches_whole_text(tiny):
    """Tokenizing prompt and target apart gives the same ids as the full reference string."""
    task = get_task("mnli")
    row = {"premise": "The cat sat.", "hypothesis": "A cat.", "label": "neutral"}
    (example,) = encode_examples(tiny.tokenizer, [task.prompt_text(row)], [task.target_text(row)])
    whole = tiny.tokenizer(task.train_text(row, "<|endoftext|>"), add_special_tokens=False)["input_ids"]
    assert example.ids.tolist() == whole


def test_gptj_tokenizer_quirks(tiny):
    tok = tiny.tokenizer
    assert len(tok) == 50400 and tiny.model.config.vocab_size == 50400
    assert tok.pad_token == "<|extratoken_1|>" and tok.pad_token_id == 50257
    assert tok.eos_token_id == 50256 and tok.convert_ids_to_tokens(50399) == "<|extratoken_143|>"
    assert tok("hello world")["input_ids"] == [31373, 995]  # GPT-2 BPE


examples_strategy = st.lists(
    st.integers(2, 12).flatmap(
        lambda n: st.tuples(st.lists(st.integers(1, 50_000), min_size=n, max_size=n), st.integers(1, n - 1))
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=80, deadline=None)
@given(pairs=examples_strategy, loss_on=st.sampled_from(["all", "target"]))
def test_isolated_rows_hold_each_example_once_and_batches_shift_labels(pairs, loss_on):
    """Whatever the examples: every one stands whole in one row with positions 0..n-1, the loss
    counts exactly its wanted tokens after the first, and collate's labels are the next token."""
    examples = [Encoded(ids, n_prompt) for ids, n_prompt in pairs]
    rows = pack(examples, "isolated", 15, loss_on, pad_id=0)
    found = []
    for row in rows:
        assert len(row.tokens) == 16 and len(row.positions) == len(row.loss_mask) == 15
        used = int((row.tokens != 0).sum())  # ids are >= 1, the padding 0
        assert row.real == min(used, 15) and not row.tokens[used:].any()
        starts = [t for t, p in enumerate(row.positions.tolist()) if p == 0 and t < used] + [used]
        found += [row.tokens[a:b].tolist() for a, b in zip(starts, starts[1:])]
    assert sorted(found) == sorted(ids for ids, _ in pairs)
    wanted = sum(len(ids) - (1 if loss_on == "all" else n_prompt) for ids, n_prompt in pairs)
    assert sum(int(row.loss_mask.sum()) for row in rows) == wanted
    batch = collate(rows, pad_id=0)
    kept = batch["labels"] != IGNORE_INDEX
    assert kept.sum().item() == wanted
    tokens = torch.stack([torch.from_numpy(row.tokens.astype("int64")) for row in rows])
    assert torch.equal(batch["labels"][kept], tokens[:, 1:][kept])
    assert torch.equal(batch["input_ids"], tokens[:, :-1])


def test_concat_rows_are_read_only_views_of_one_stream():
    """At MNLI's size the rows must not each copy the stream: they are views, and frozen."""
    rows = pack([A, B, A, B], "concat", 3, "all", pad_id=0)
    assert len(rows) == 4 and all(r.tokens.base is rows[0].tokens.base is not None for r in rows)
    assert A.ids.dtype == np.int32 and rows[0].tokens.dtype == np.int32
    with pytest.raises(ValueError):
        rows[1].tokens[0] = 7
