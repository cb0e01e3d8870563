"""Write the notebook the browser test opens: the explorer on the (untrained) seed net."""

from __future__ import annotations

from pathlib import Path

import nbformat

CELLS = [
    "import os\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n%matplotlib widget",
    "import gradmagic as gm\nfrom gradmagic import examples\n"
    "model = examples.regression_net(seed=1)\nx, y = examples.regression_data(64)\n"
    "panel = gm.explore(model, x, y, reference=examples.regression_target, "
    "reference_grad=examples.regression_slope)\npanel",
]


def write(folder: Path, name: str = "explorer.ipynb") -> int:
    """Write the notebook; return its number of cells."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / name)
    return len(CELLS)
