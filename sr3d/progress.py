"""Progress of the long jobs (upscaling, self-supervised training, evaluation, studies, batches): one type.

A job calls `progress(Step(unit, done, total, message))` as it goes. A `Step` is the line of text
a log shows and also the count a bar needs, so one call feeds both: a log callback (`print`,
`list.append`, `print_line`) takes the step as the line it is, a bar (the `sr3d` command's) reads
`done` of `total` `unit`.
"""
from __future__ import annotations

import sys
from typing import Callable


class Step(str):
    """One progress report: a line of text that carries its count.

    `done` of `total` `unit` are finished (total None: not known in advance, e.g. training to a
    time budget). message: the line; None gives "done/total unit" (`Step("bands", 2, 5)` is
    "2/5 bands").
    """

    unit: str
    done: int
    total: int | None

    def __new__(cls, unit: str, done: int, total: int | None, message: str | None = None) -> "Step":
        if message is None:
            message = f"{done} {unit}" if total is None else f"{done}/{total} {unit}"
        step = super().__new__(cls, message)
        step.unit, step.done, step.total = unit, done, total
        return step


Progress = Callable[[Step], None]


def print_line(step: str) -> None:
    """A `progress` callback that writes each report as one line to stderr."""
    print(step, file=sys.stderr, flush=True)
