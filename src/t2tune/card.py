"""The Hugging Face model card written into every export (``hf/README.md``)."""

from __future__ import annotations

from typing import Any

import yaml

from . import __version__
from .tasks import Task


def model_card(cfg: Any, task: Task, base_name: str, state: Any, last_eval: dict[str, Any]) -> str:
    example = {name: f"<{name}>" for name in task.input_fields}
    prompt = task.prompt_text(example)
    target = task.target_text({name: f"<{name}>" for name in task.target_fields})
    if last_eval:
        shown = {k: v for k, v in last_eval.items() if isinstance(v, (int, float, str)) and v is not None}
        data = f"{cfg.data.validation or cfg.data.train} (split {cfg.data.validation_split})"
        metrics = (f"Measured at optimizer step {last_eval.get('step')} on {shown.get('n')} rows of {data}, "
                   f"{shown.get('mode')} mode:\n\n"
                   + "\n".join(f"| {k} | {v} |" for k, v in shown.items() if k not in ("task", "mode", "step"))
                   + "\n")
        metrics = "| metric | value |\n|---|---|\n" + metrics
    else:
        metrics = "No validation was run for this export.\n"
    front = {"library_name": "transformers", "base_model": base_name, "tags": ["t2tune", "text2text", task.name],
             "pipeline_tag": "text-generation"}
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {task.name} fine-tune of {base_name}

Fine-tuned with t2tune {__version__} as a text-to-text task: the model reads the prompt and
generates the answer followed by its end-of-text token.

## Prompt format

Training example (`<EOS>` is the tokenizer's end-of-text token):

```
{prompt} {target}<EOS>
```

At inference, give the prompt up to and including `target:` and decode greedily:

```
{prompt}
```
{f"Answers are one of: {', '.join(task.labels)}." if task.labels else "Answers are free text."}

## Training

Trained for {state.optimizer_step} optimizer steps ({state.tokens_seen:,} tokens) on
`{cfg.data.train}`. Configuration:

```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()}
```

## Validation

{metrics}
## Upload

No upload was attempted. To publish this folder:

```
huggingface-cli upload YOUR_NAME/{task.name}-{base_name.split('/')[-1]} . .
```
"""
