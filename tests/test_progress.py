"""Progress: a keras Progbar for long diagnoses, only once they have run for a while."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp

import gradmagic as gm
from gradmagic.core.diagnose.progress import Progress


def test_a_long_run_shows_a_bar_that_reaches_the_total(capsys):
    progress = Progress(3, verbose=True, unit="row", after=0.0)
    for _ in range(2):
        progress()
    progress.done()
    shown = capsys.readouterr().out
    assert "3/3" in shown and "row" in shown


def test_a_quick_or_silent_run_prints_nothing(capsys):
    for verbose, after in ((True, 60.0), (False, 0.0)):
        progress = Progress(3, verbose=verbose, after=after)
        for _ in range(3):
            progress()
        progress.done()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("call", [gm.check_gradients, gm.explain])
def test_verbose_must_be_a_bool(call):
    model = mlp()
    x, y = np.ones((2, 3), "float32"), np.ones((2, 2), "float32")
    with pytest.raises(gm.GradmagicError, match="verbose='yes'"):
        call(model, x, y, verbose="yes")
