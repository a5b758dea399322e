"""Reading examples from local files or the Hugging Face hub, and checking every row; where
data comes from when the config does not say (a task's own hub dataset).

Local files (JSONL, CSV, TSV including GLUE's, Parquet) are parsed here rather than through
``datasets`` so that every problem can name its file and line: ``train.jsonl:17: ...``.
Each returned row carries ``_where`` ("file:line") for errors found later (e.g. too long).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError, short
from .files import parse_json
from .tasks import Task

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_FALLBACKS = {"validation": ("validation", "dev", "validation_matched", "dev_matched", "val"), "train": ("train",)}
Row = dict[str, Any]


MAX_LINE_BYTES = 4 << 20  # far above any real example (a SQuAD context is a few KiB), far below harm


def _decode_lines(path: Path) -> Iterator[str]:
    """The file's lines as text, streamed: a line over ``MAX_LINE_BYTES`` is an error before it
    is read whole, a UTF-8 byte-order mark (as Excel and Notepad write) is dropped."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number in itertools.count(1):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{path}:{number}: line longer than {MAX_LINE_BYTES >> 20} MiB; one example per line is expected"
                )
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line); re-encode the file as UTF-8"
                ) from None


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(_decode_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: malformed JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        row["_where"] = f"{path}:{number}"
        rows.append(row)
    return rows


def read_delimited(path: Path, delimiter: str) -> list[Row]:
    lines = (line + "\n" for line in _decode_lines(path))  # csv keeps newlines inside quoted fields
    # GLUE's TSVs hold unbalanced quotes inside sentences; quotes carry no meaning there.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(lines, delimiter=delimiter, quoting=quoting)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (expected a header line)")
        return _checked_rows(path, reader)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None


def _checked_rows(path: Path, reader: csv.DictReader) -> list[Row]:
    rows = []
    for row in reader:
        number = reader.line_num
        if None in row:
            raise DataError(f"{path}:{number}: more fields than the header's {len(reader.fieldnames)}")
        missing = [k for k, v in row.items() if v is None]
        if missing:
            raise DataError(
                f"{path}:{number}: missing column(s) {', '.join(missing)} (the line has fewer fields than the header)"
            )
        row["_where"] = f"{path}:{number}"
        rows.append(row)
    return rows


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq  # comes with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    rows = table.to_pylist()
    for number, row in enumerate(rows, 1):
        row["_where"] = f"{path}:row {number}"
    return rows


def read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use one of {', '.join(EXTENSIONS)})")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if suffix == ".parquet":
        rows = read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        rows = read_delimited(path, "\t" if suffix == ".tsv" else ",")
    else:
        rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in EXTENSIONS


def resolve_local(source: str, split: str) -> Path | None:
    """The local file for a source and split, None when the source is a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in (split, *SPLIT_FALLBACKS.get(split, ())):
            found = [path / f"{name}{ext}" for ext in EXTENSIONS if (path / f"{name}{ext}").is_file()]
            if len(found) > 1:
                raise DataError(
                    f"{path}: several {name} files ({', '.join(p.name for p in found)}); "
                    "keep one, or name the file itself"
                )
            if found:
                return found[0]
        raise DataError(f"{path}: no {split} file in this folder (expected {split}.jsonl, .csv, .tsv or .parquet)")
    if path.exists() or _looks_local(source):
        return path
    return None


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the hub's name resolves and accepts a TCP connection (skips minutes of retries)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub_if_unreachable() -> Iterator[None]:
    """Without network only a local hub cache can serve a dataset: switch the hub clients to
    offline mode for this one load (minutes of retries become a ~2 s failure), then restore them."""
    import datasets
    import huggingface_hub.constants as hub_constants

    if hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub(dataset_id: str, config: str | None, split: str) -> list[Row]:
    import logging

    import datasets

    # the hub client logs every retry; the one error below says all that matters (their levels
    # are put back afterwards)
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with _offline_hub_if_unreachable():
            ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # network, auth and missing-dataset errors all end here
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"could not load '{dataset_id}' ({config or 'default'}, split {split}) from the Hugging Face hub: "
            f"{first[:200]}. Without network, pass local data: data.train=DIR_OR_FILE "
            "data.validation=DIR_OR_FILE (with make: make demo DATA=../shared/data/mnli)"
        ) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    rows = [dict(r) for r in ds]
    for number, row in enumerate(rows):
        row["_where"] = f"{dataset_id}[{split}] row {number}"
    return rows


def with_hub_defaults(task: Task, source: str, split: str, hub_config: str | None) -> tuple[str, str | None]:
    """(split, hub config) for ``source``: a task's own hub dataset knows its configuration and
    validation split (``nyu-mll/glue`` for MNLI: ``mnli``, ``validation_mismatched``)."""
    if task.hub and source == task.hub[0]:
        hub_config = hub_config or task.hub[1]
        if split == "validation":
            split = task.hub[2]
    return split, hub_config


def load_rows(source: str, split: str, hub_config: str | None = None) -> list[Row]:
    path = resolve_local(source, split)
    return read_file(path) if path is not None else load_hub(source, hub_config, split)


def prepare_rows(task: Task, rows: list[Row], need_target: bool = True) -> list[Row]:
    """Rename aliased columns, derive task fields and check each row; errors name file and line."""
    out = []
    for row in rows:
        where = row.get("_where", "?")
        row = {task.aliases.get(k, k): v for k, v in row.items()}
        if task.prepare is not None:
            try:
                row = task.prepare(row)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise DataError(f"{where}: {exc}") from None
        for name in task.input_fields:
            value = row.get(name)
            if value is None:
                raise DataError(
                    f"{where}: missing column '{name}' (task {task.name} needs {', '.join(task.input_fields)})"
                )
            if not isinstance(value, str):
                value = row[name] = str(value)
            if not value.strip():
                raise DataError(f"{where}: empty '{name}'; remove the row or fill it in")
        if task.is_label_task and ("label" in row or need_target):
            row["label"] = _label_word(task, row.get("label"), where)
        elif need_target:
            for name in task.target_fields:
                if not isinstance(row.get(name), str) or not row[name].strip():
                    raise DataError(f"{where}: missing or empty target column '{name}'")
        out.append(row)
    return out


_INDEX = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²" is a digit to str.isdigit, not to int


def _label_word(task: Task, value: Any, where: str) -> str:
    """A row's label as the task's label word. The rule: a value is first matched as a label
    word (its text, stripped). Only when it matches none, and none of the task's label words
    is itself a number, is an integer (or a string of ASCII digits) read as a 0-based index
    into the labels, as GLUE files hold them. So labels ``["1", "0"]`` read ``1`` as ``"1"``,
    and ``["1", "2"]`` (Winogrande) read ``"2"`` as ``"2"``. A boolean is only ever the label
    word true or false (any case), never an index.

    >>> from types import SimpleNamespace as N
    >>> [_label_word(N(labels=("yes", "no"), name="t"), v, "f:1") for v in ("no", 0, "1")]
    ['no', 'yes', 'no']
    >>> [_label_word(N(labels=("False", "True"), name="t"), v, "f:1") for v in (True, False, 1)]
    ['True', 'False', 'True']
    >>> [_label_word(N(labels=("1", "0"), name="t"), v, "f:1") for v in ("1", 1, 0, " 0 ")]
    ['1', '1', '0', '0']
    """
    labels = task.labels or ()
    if value is None:
        raise DataError(f"{where}: missing column 'label'")
    if isinstance(value, bool):  # only as the label word "true" / "false": which of yes/no is True?
        word = [label for label in labels if label.lower() == str(value).lower()]
        if not word:
            raise DataError(
                f"{where}: label {value} is a boolean, and task {task.name}'s labels "
                f"({', '.join(labels)}) hold no word true/false; write the label word, or its index"
            )
        return word[0]
    text = value.strip() if isinstance(value, str) else str(value) if isinstance(value, int) else None
    if text is not None and text in labels:
        return text
    numeral_labels = any(_INDEX.fullmatch(label) for label in labels)
    if text is not None and not numeral_labels and (isinstance(value, int) or _INDEX.fullmatch(text)):
        index = int(text) if _INDEX.fullmatch(text) else -1  # negative or 10+ digits: out of range
        if 0 <= index < len(labels):
            return labels[index]
        shown = text if len(text) < 24 else text[:20] + "..."
        raise DataError(
            f"{where}: label index {shown} out of range for task {task.name} "
            f"(0..{len(labels) - 1} = {', '.join(labels)})"
        )
    raise DataError(
        f"{where}: unknown label {short(value, 40)} for task {task.name} (expected one of "
        f"{', '.join(labels)}{'' if numeral_labels else ', or an index from 0'})"
    )


def load_examples(
    task: Task,
    source: str,
    split: str,
    hub_config: str | None = None,
    limit: int | None = None,
    need_target: bool = True,
) -> list[Row]:
    rows = load_rows(source, split, hub_config)
    if limit is not None:
        rows = rows[:limit]
    return prepare_rows(task, rows, need_target=need_target)


def public_fields(row: Row) -> Row:
    """A row without bookkeeping fields, for prediction files."""
    return {k: v for k, v in row.items() if not k.startswith("_")}
