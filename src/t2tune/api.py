"""The reference's Trainer facade: ``Trainer(config, pretrained, dataset, eval_dataset,
eval_config, tokenizer, metric, postprocess)`` with ``train()``, ``evaluate()`` and
``save_hf_checkpoint(path)``. A thin layer over :mod:`t2tune.recipe`, which does the work."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import EvalConfig, RunConfig
from .evaluation import EvalResult
from .recipe import Run, RunResult, export_weights, prepare
from .tasks import Task
from .training import TrainState


class Trainer:
    """Fine-tune ``pretrained`` on ``dataset`` (rows), validate on ``eval_dataset``.

    ``metric(predictions, references) -> dict`` and ``postprocess(text) -> answer`` replace the
    task's own when given; ``config`` is a :class:`RunConfig` (its ``eval`` section is replaced
    by ``eval_config`` when given). An existing ``config.out_dir`` must hold the same run.
    """

    def __init__(
        self,
        config: RunConfig,
        pretrained: Any,
        dataset: Sequence[dict[str, Any]],
        eval_dataset: Sequence[dict[str, Any]] | None = None,
        eval_config: EvalConfig | None = None,
        tokenizer: Any = None,
        metric: Callable | None = None,
        postprocess: Callable | None = None,
        task: Task | None = None,
        base_name: str | None = None,
        accelerator: Any = None,
    ):
        self.config = config
        self.run: Run = prepare(
            config,
            model=pretrained,
            tokenizer=tokenizer,
            train_rows=dataset,
            eval_rows=eval_dataset or [],
            eval_config=eval_config,
            metric=metric,
            postprocess=postprocess,
            task=task,
            base_name=base_name,
            accelerator=accelerator,
        )
        self.result: RunResult | None = None

    @property
    def model(self) -> Any:
        return self.run.model

    @property
    def state(self) -> TrainState:
        return self.run.state

    @property
    def last_eval(self) -> dict[str, Any]:
        return self.run.last_eval

    def train(self) -> TrainState:
        self.result = self.run.train()
        return self.result.state

    def evaluate(self, limit: int | None = None) -> EvalResult:
        return self.run.evaluate(limit)

    def save_hf_checkpoint(self, path: str | Path, merge: bool = True) -> Path:
        export_weights(self.run, Path(path), merge)
        return Path(path)
