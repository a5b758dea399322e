"""Tasks: how a data row becomes a prompt and a target, and how generated text becomes an answer.

A training example is ``prompt + answer_text(target) + EOS``, the answer being a space and the
target; a validation prompt stops after the prompt (which ends with ``target:``). For MNLI and
GPT-J this is byte for byte the reference:

    >>> t = get_task("mnli")
    >>> row = {"hypothesis": "H.", "premise": "P.", "label": "neutral"}
    >>> t.train_text(row, eos="<|endoftext|>")
    'mnli hypothesis: H. premise: P. target: neutral<|endoftext|>'

Where a model's end-of-text token is not GPT-J's ``<|endoftext|>``, that model's own EOS text
takes its place (SmolLM2-Instruct: ``<|im_end|>``), so generation stops where training taught it.

Label tasks have ``labels``; free-text tasks (QA, NER as text) have none and compare generated
text with references. Both share one path through data, packing, training and evaluation.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, short
from .yamlfile import read_yaml

# A generation that is no label word. None, not a string: no label a user writes can equal it.
INVALID = None
PLACEHOLDER = re.compile(r"{(\w+)}")


def answer_text(target: str) -> str:
    """What follows a prompt in training, and what scoring appends: a space, then the target
    (EOS comes after it, as text here or as the tokenizer's id in :mod:`t2tune.tokenize`)."""
    return " " + target


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str  # template over row fields, ends where the target starts
    target: str = "{label}"  # template of the answer
    labels: tuple[str, ...] | None = None  # label words; None for free-text tasks
    metric: str = "accuracy"  # accuracy | squad | entities
    extra_metrics: tuple[str, ...] = ()  # "mcc" adds Matthews correlation
    aliases: dict[str, str] = field(default_factory=dict)  # source column -> task column
    truncate_field: str | None = None  # field that may be cut to fit seq_len (QA context)
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # adds derived fields
    hub: tuple[str, str | None, str] | None = None  # (dataset id, config, validation split)
    description: str = ""
    custom_postprocess: Callable[[str], str] | None = None  # replaces the default below (API users)

    @property
    def is_label_task(self) -> bool:
        return self.labels is not None

    @property
    def input_fields(self) -> list[str]:
        return PLACEHOLDER.findall(self.prompt)

    @property
    def target_fields(self) -> list[str]:
        return PLACEHOLDER.findall(self.target)

    def prompt_text(self, row: dict[str, Any]) -> str:
        return self.prompt.format(**row)

    def target_text(self, row: dict[str, Any]) -> str:
        return self.target.format(**row)

    def train_text(self, row: dict[str, Any], eos: str) -> str:
        return self.prompt_text(row) + answer_text(self.target_text(row)) + eos

    def references(self, row: dict[str, Any]) -> list[str]:
        """Acceptable answers for a row: the gold label, or every reference answer."""
        if "references" in row:
            return list(row["references"])
        return [self.target_text(row)]

    def postprocess(self, generated: str, eos: str | None) -> str | None:
        """Generated text → answer. As the reference: cut at EOS, strip; labels must match
        exactly, and text that is no label word is :data:`INVALID` (None)."""
        if self.custom_postprocess is not None:
            return self.custom_postprocess(generated)
        text = generated.split(eos, 1)[0] if eos else generated
        text = text.strip()
        if self.labels is None:
            return text
        return text if text in self.labels else INVALID


# --- built-in tasks -------------------------------------------------------------------------


def _squad_prepare(row: dict[str, Any]) -> dict[str, Any]:
    """Adds ``answer`` (the first reference, the training target) and ``references``; rows
    without answers (prediction input) pass through."""
    answers = row.get("answers")
    if answers is None:
        return row
    if isinstance(answers, dict):  # hub SQuAD: {"text": [...], "answer_start": [...]}
        answers = answers.get("text")
    if isinstance(answers, str):
        answers = [answers]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("field 'answers' must be a non-empty list of non-empty strings")
    return {**row, "answer": answers[0], "references": list(answers)}


ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
NO_ENTITIES = "none"


def entities_from_iob2(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """IOB2 tags → ordered ``(type, span text)`` pairs.

    >>> entities_from_iob2(["John", "Smith", "visits", "Paris"], ["B-PER", "I-PER", "O", "B-LOC"])
    [('PER', 'John Smith'), ('LOC', 'Paris')]
    """
    spans: list[tuple[str, list[str]]] = []
    prev = "O"
    for token, tag in zip(tokens, tags):
        if tag.startswith("I-") and prev != "O" and prev[2:] == tag[2:]:
            spans[-1][1].append(token)  # continues the open entity
        elif tag != "O":
            spans.append((tag[2:], [token]))  # B-X, or a stray I-X, opens one
        prev = tag
    return [(kind, " ".join(words)) for kind, words in spans]


def render_entities(entities: list[tuple[str, str]]) -> str:
    """``[("PER", "John Smith"), ("LOC", "Paris")]`` → ``"PER: John Smith; LOC: Paris"``."""
    return "; ".join(f"{kind}: {text}" for kind, text in entities) if entities else NO_ENTITIES


def read_entities(text: str, policy: str = "lenient") -> tuple[list[tuple[str, str]], bool]:
    """Generated entity list → ``(entities, well_formed)``, the policy for partly well-formed
    lists. A list is malformed when any part is not ``TYPE: span``, as when generation was cut
    off; ``strict`` then predicts nothing for the row, ``lenient`` keeps its well-formed entities.

    >>> read_entities("PER: Marcello Cuttitta; PER", "lenient")
    ([('PER', 'Marcello Cuttitta')], False)
    >>> read_entities("PER: Marcello Cuttitta; PER", "strict")
    ([], False)
    >>> read_entities("none")
    ([], True)
    """
    text = text.strip()
    if text == NO_ENTITIES:
        return [], True
    entities, well_formed = [], True
    for part in text.split(";"):
        kind, sep, span = part.strip().partition(":")
        if not sep or kind.strip() not in ENTITY_TYPES or not span.strip():
            well_formed = False
            continue
        entities.append((kind.strip(), span.strip()))
    well_formed = well_formed and bool(entities)
    return (entities if well_formed or policy == "lenient" else []), well_formed


def parse_entities(text: str) -> list[tuple[str, str]] | None:
    """Inverse of :func:`render_entities`; None when the text is malformed.

    >>> parse_entities("PER: John Smith; LOC: Paris")
    [('PER', 'John Smith'), ('LOC', 'Paris')]
    >>> parse_entities("none")
    []
    >>> parse_entities("John Smith") is None
    True
    """
    entities, well_formed = read_entities(text, "strict")
    return entities if well_formed else None


def _conll_prepare(row: dict[str, Any]) -> dict[str, Any]:
    tokens, tags = row.get("tokens"), row.get("ner_tags")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("field 'tokens' must be a non-empty list of strings")
    if tags is None:  # prediction input: no gold entities
        return {**row, "sentence": " ".join(tokens)}
    if not isinstance(tags, list) or len(tags) != len(tokens):
        raise ValueError("field 'ner_tags' must be a list as long as 'tokens'")
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    tags = [names[t] if isinstance(t, int) else t for t in tags]  # hub rows hold class indices
    return {**row, "sentence": " ".join(tokens), "entities": render_entities(entities_from_iob2(tokens, tags))}


def _glue_nli(name: str, labels: tuple[str, ...], hub_config: str, val_split: str, **kw: Any) -> Task:
    return Task(
        name=name,
        prompt=name + " hypothesis: {hypothesis} premise: {premise} target:",
        labels=labels,
        aliases={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        truncate_field="premise",
        hub=("nyu-mll/glue", hub_config, val_split),
        **kw,
    )


BUILTIN: dict[str, Task] = {
    "mnli": _glue_nli(
        "mnli",
        ("entailment", "neutral", "contradiction"),
        "mnli",
        "validation_mismatched",
        description="GLUE MNLI, the reference's exact T5-style format",
    ),
    "rte": _glue_nli(
        "rte", ("entailment", "not_entailment"), "rte", "validation", description="GLUE RTE, binary entailment"
    ),
    "sst2": Task(
        name="sst2",
        prompt="sst2 sentence: {sentence} target:",
        labels=("negative", "positive"),
        hub=("nyu-mll/glue", "sst2", "validation"),
        description="GLUE SST-2 sentiment",
    ),
    "squad": Task(
        name="squad",
        prompt="question: {question} context: {context} target:",
        target="{answer}",
        metric="squad",
        truncate_field="context",
        prepare=_squad_prepare,
        hub=("rajpurkar/squad", None, "validation"),
        description="extractive QA (SQuAD v1.1 style), exact match and F1",
    ),
    "conll2003": Task(
        name="conll2003",
        prompt="conll2003 sentence: {sentence} target:",
        target="{entities}",
        metric="entities",
        prepare=_conll_prepare,
        hub=("eriktks/conll2003", None, "validation"),
        description="named entities as text: 'PER: John Smith; LOC: Paris' or 'none'",
    ),
}


def template_problems(key: str, template: Any) -> list[str]:
    """Why ``template`` is not a safe prompt/target template: placeholders must be plain column
    names, so ``str.format`` never reaches attributes, indexes or format specs.

    >>> template_problems("prompt", "q: {question} target:")
    []
    >>> template_problems("prompt", "{premise.__class__}")
    ["'prompt': placeholder {premise.__class__} must be a plain column name (letters, digits, _)"]
    """
    if not isinstance(template, str):
        return [f"'{key}' must be a string, got {type(template).__name__}"]
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"'{key}': {exc} (write a literal brace as {{{{ or }}}})"]
    problems = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not re.fullmatch(r"\w+", name):
            problems.append(f"'{key}': placeholder {shown} must be a plain column name (letters, digits, _)")
        elif spec or conversion:
            problems.append(f"'{key}': placeholder {shown} may not have a format spec or conversion")
    return problems


def label_problems(labels: list[str]) -> list[str]:
    """Label words that could only give wrong results: one given twice, or one with white space
    around it (generated answers are stripped, so it could never match).

    >>> label_problems(["yes", "no", "yes", " maybe"])
    ["'labels': 'yes' is given twice", "'labels': ' maybe' has white space around it, which answers never have"]
    """
    seen: set[str] = set()
    problems = []
    for x in labels:
        if x in seen:
            problems.append(f"'labels': {short(x)} is given twice")
        seen.add(x)
    return problems + [
        f"'labels': {short(x)} has white space around it, which answers never have" for x in labels if x != x.strip()
    ]


TASK_KEYS = {
    "name",
    "prompt",
    "target",
    "labels",
    "metric",
    "extra_metrics",
    "aliases",
    "truncate_field",
    "description",
}


def load_task_file(path: Path) -> Task:
    """A custom task from YAML: ``name``, ``prompt``, optional ``target``, ``labels``, ``metric``...
    Every key is checked here, when the task is loaded, so a bad template never trains."""
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a task file must be a mapping with at least 'prompt'")
    errors = [f"unknown key {short(k)}" for k in spec if k not in TASK_KEYS]
    errors += template_problems("prompt", spec.get("prompt"))
    if not errors and not PLACEHOLDER.search(spec["prompt"]):
        errors.append("'prompt' must hold {column} placeholders")
    errors += template_problems("target", spec.get("target", "{label}"))
    if not errors:  # the prompt must not hand the model its answer
        answer = set(PLACEHOLDER.findall(spec.get("target", "{label}")))
        errors += [
            f"'prompt' holds {{{name}}}, which is the target: the model would read its answer"
            for name in sorted(set(PLACEHOLDER.findall(spec["prompt"])) & answer)
        ]
    labels = spec.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x.strip() for x in labels)
    ):
        errors.append("'labels' must be a list of at least two non-empty strings")
    elif labels is not None:
        errors += label_problems(labels)
    metric = spec.get("metric", "accuracy" if labels else "squad")
    if metric not in ("accuracy", "squad", "entities"):
        errors.append(f"'metric' must be accuracy, squad or entities, got {short(metric)}")
    elif metric == "accuracy" and labels is None:
        errors.append("metric 'accuracy' needs 'labels'; free-text tasks use 'squad' or 'entities'")
    extra = spec.get("extra_metrics", [])
    if not isinstance(extra, list) or not all(x in ("mcc",) for x in extra):
        errors.append(f"'extra_metrics' must be a list of: mcc; got {short(extra)}")
    aliases = spec.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        errors.append("'aliases' must map source column names to task column names (strings)")
    for key in ("name", "description", "truncate_field"):
        if key in spec and not isinstance(spec[key], str):
            errors.append(f"'{key}' must be a string, got {type(spec[key]).__name__}")
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    target = spec.get("target", "{label}")
    return Task(
        name=spec.get("name", path.stem),
        prompt=spec["prompt"],
        target=target,
        labels=tuple(labels) if labels else None,
        metric=metric,
        extra_metrics=tuple(extra),
        aliases=dict(aliases),
        truncate_field=spec.get("truncate_field"),
        prepare=_squad_prepare if metric == "squad" and "{answer}" in target else None,
        description=spec.get("description", f"custom task from {path}"),
    )


def get_task(name_or_path: str) -> Task:
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"task: file {path} not found")
        return load_task_file(path)
    raise ConfigError(
        f"task: unknown task '{name_or_path}'; built-in tasks are {', '.join(BUILTIN)}, "
        "or give the path of a task .yaml file"
    )
