"""The training loop's schedule, without a model: which steps log, validate and checkpoint, and
how it stops (steps, a signal, the time budget)."""

import signal

from t2tune.recipe import fit
from t2tune.training import Schedule, StepResult, StopRequest, TrainState


class FakeRun:
    """Records the loop's calls; ``signal_at`` / ``late_at`` simulate a SIGTERM or the time budget."""

    def __init__(self, stop: StopRequest, signal_at: int | None = None, late_at: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.stop, self.signal_at, self.late_at = stop, signal_at, late_at
        self.state = TrainState()

    def out_of_time(self) -> bool:
        return self.late_at is not None and self.state.optimizer_step >= self.late_at

    def agree(self, seconds: float) -> float:
        return seconds

    def step(self) -> StepResult:
        if self.signal_at == self.state.optimizer_step + 1:
            self.stop.signal = signal.SIGTERM  # arrives during this step
        return StepResult(loss=1.0, tokens=10, grad_norm=None)

    def progress(self, result, seconds):
        self.calls.append(("progress", self.state.optimizer_step))

    def log(self, result, seconds):
        self.calls.append(("log", self.state.optimizer_step))

    def validate(self):
        self.calls.append(("validate", self.state.optimizer_step))

    def checkpoint(self):
        self.calls.append(("checkpoint", self.state.optimizer_step))


def _run(schedule, **kw):
    stop = StopRequest()  # not entered: no handlers installed, the fake sets the flag
    run = FakeRun(stop, **kw)
    reason = fit(run, run.state, schedule, stop)
    return reason, run


def _steps(run, verb):
    return [step for name, step in run.calls if name == verb]


def test_which_steps_log_validate_checkpoint():
    reason, run = _run(Schedule(steps=7, log_every=3, eval_every=2, checkpoint_every=3))
    assert reason == "steps" and run.state.optimizer_step == 7
    assert _steps(run, "progress") == [1, 2, 3, 4, 5, 6, 7]
    assert _steps(run, "log") == [3, 6, 7]  # the last step is always logged
    assert _steps(run, "validate") == [2, 4, 6]  # the last step's validation comes after the loop
    assert _steps(run, "checkpoint") == [3, 6]
    assert run.state.tokens_seen == 70
    # within a step: log, then validate, then checkpoint
    assert run.calls[run.calls.index(("log", 6)) :][:3] == [("log", 6), ("validate", 6), ("checkpoint", 6)]


def test_zero_means_only_after_the_loop():
    _, run = _run(Schedule(steps=4))
    assert _steps(run, "validate") == [] and _steps(run, "checkpoint") == []
    assert _steps(run, "log") == [1, 2, 3, 4]


def test_signal_stops_after_the_current_step():
    reason, run = _run(Schedule(steps=10, checkpoint_every=5), signal_at=3)
    assert reason == "signal" and run.state.optimizer_step == 3
    assert _steps(run, "log") == [1, 2, 3]  # the step in flight finishes and is logged


def test_time_budget_stops_at_the_same_step_check():
    reason, run = _run(Schedule(steps=10), late_at=4)
    assert reason == "max_minutes" and run.state.optimizer_step == 4


def test_resumed_state_continues_the_schedule():
    stop = StopRequest()
    run = FakeRun(stop)
    run.state.optimizer_step = 5
    assert fit(run, run.state, Schedule(steps=8, checkpoint_every=2), stop) == "steps"
    assert _steps(run, "checkpoint") == [6] and _steps(run, "progress") == [6, 7, 8]
