import json

import pytest
from conftest import SHARED_DATA, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from t2tune.data import (
    load_examples,
    prepare_rows,
    read_delimited,
    read_file,
    read_jsonl,
)
from t2tune.errors import DataError
from t2tune.tasks import get_task

MNLI = get_task("mnli")


def test_jsonl_csv_tsv_parquet_read_alike(tmp_path):
    rows = [
        {"premise": "p one", "hypothesis": "h one", "label": "neutral"},
        {"premise": "p, two", "hypothesis": 'h "two"', "label": 2},
    ]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.csv").write_text('premise,hypothesis,label\np one,h one,neutral\n"p, two","h ""two""",2\n')
    (tmp_path / "a.tsv").write_text('sentence1\tsentence2\tgold_label\np one\th one\tneutral\np, two\th "two"\t2\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"premise": ["p one", "p, two"], "hypothesis": ["h one", 'h "two"'], "label": [1, 2]}),
        tmp_path / "a.parquet",
    )
    for ext in ("jsonl", "csv", "tsv", "parquet"):
        got = load_examples(MNLI, str(tmp_path / f"a.{ext}"), "train")
        assert [(r["premise"], r["hypothesis"], r["label"]) for r in got] == [
            ("p one", "h one", "neutral"),
            ("p, two", 'h "two"', "contradiction"),
        ], ext


def test_folder_source_finds_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"premise": "p", "hypothesis": "h", "label": "neutral"}])
    write_jsonl(tmp_path / "dev.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}])
    assert load_examples(MNLI, str(tmp_path), "validation")[0]["label"] == "entailment"


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"premise": "p", "hypothesis": "h", "label": "neutral"}\n{"premise": "p",\n', r"x.jsonl:2: malformed JSON"),
        ('{"premise": "p", "hypothesis": "h", "label": "maybe"}\n', r"x.jsonl:1: unknown label 'maybe'"),
        ('{"premise": "p", "hypothesis": "h", "label": 7}\n', r"x.jsonl:1: label index 7 out of range"),
        ('{"premise": "p", "label": "neutral"}\n', r"x.jsonl:1: missing column 'hypothesis'"),
        ('{"premise": "  ", "hypothesis": "h", "label": "neutral"}\n', r"x.jsonl:1: empty 'premise'"),
        ("[1, 2]\n", r"x.jsonl:1: each line must be a JSON object"),
        ("", r"x.jsonl: no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(MNLI, str(path), "train")


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"premise": "ok", "hypothesis": "h", "label": "neutral"}\n{"premise": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not UTF-8"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"nope.jsonl: data file not found"):
        read_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"no train file in this folder"):
        load_examples(MNLI, str(tmp_path / ""), "train")


def test_csv_missing_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("premise,hypothesis,label\np,h,neutral\np only\n")
    with pytest.raises(DataError, match=r"x.csv:3: missing column\(s\) hypothesis, label"):
        read_delimited(path, ",")


def test_shared_data_loads_for_every_task():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    for task, folder, split in [
        ("mnli", "mnli", "validation"),
        ("rte", "rte", "validation"),
        ("sst2", "sst2", "validation"),
        ("squad", "xquad_en", "validation"),
        ("conll2003", "conll2003", "validation"),
    ]:
        rows = load_examples(get_task(task), str(SHARED_DATA / folder), split, limit=20)
        assert len(rows) == 20
        get_task(task).train_text(rows[0], "<eos>")


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip()
)


@settings(max_examples=60, deadline=None)
@given(premise=text, hypothesis=text, label=st.sampled_from(["entailment", "neutral", "contradiction", 0, 1, 2]))
def test_jsonl_round_trip_and_prompt_property(tmp_path_factory, premise, hypothesis, label):
    path = tmp_path_factory.mktemp("h") / "p.jsonl"
    path.write_text(json.dumps({"premise": premise, "hypothesis": hypothesis, "label": label}) + "\n", encoding="utf-8")
    (row,) = load_examples(MNLI, str(path), "train")
    assert row["premise"] == premise and row["hypothesis"] == hypothesis
    text_ = MNLI.train_text(row, "<|endoftext|>")
    assert text_ == f"mnli hypothesis: {hypothesis} premise: {premise} target: {row['label']}<|endoftext|>"
    assert text_.startswith(MNLI.prompt_text(row) + " ")


@settings(max_examples=40, deadline=None)
@given(
    cells=st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
            min_size=1,
            max_size=20,
        ).filter(lambda s: s.strip()),
        min_size=2,
        max_size=2,
    )
)
def test_csv_quoting_property(tmp_path_factory, cells):
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["premise", "hypothesis", "label"])
    writer.writerow([cells[0], cells[1], "neutral"])
    path = tmp_path_factory.mktemp("c") / "p.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    (row,) = prepare_rows(MNLI, read_file(path))
    assert (row["premise"], row["hypothesis"]) == (cells[0], cells[1])
