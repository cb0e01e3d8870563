"""A progress bar for diagnoses that take a while: ``keras.utils.Progbar``, shown only after a few seconds."""

from __future__ import annotations

import time

import keras


class Progress:
    """Count steps; once ``after`` seconds have passed, show a ``keras.utils.Progbar`` of them.

    Quick runs print nothing; a long one (a gradient check of a big network,
    explaining a model of hundreds of layers) shows how far it is, in a
    notebook as in a terminal.

    Args:
        total: How many steps the run will take.
        verbose: ``False`` never shows the bar.
        unit: What a step is, for the bar's rate (``"row"``, ``"layer"``).
        after: Seconds before the bar appears. Defaults to 2.
    """

    def __init__(self, total: int, verbose: bool, unit: str = "step", after: float = 2.0) -> None:
        self.total, self.verbose, self.unit, self.after = total, verbose, unit, after
        self.start, self.count, self.bar = time.perf_counter(), 0, None

    def __call__(self) -> None:
        """One step done."""
        self.count += 1
        if self.bar is None and self.verbose and time.perf_counter() - self.start > self.after:
            self.bar = keras.utils.Progbar(self.total, unit_name=self.unit)
        if self.bar is not None:
            self.bar.update(min(self.count, self.total))

    def done(self) -> None:
        """Complete the bar, if one is shown."""
        if self.bar is not None and self.count < self.total:
            self.bar.update(self.total, finalize=True)
