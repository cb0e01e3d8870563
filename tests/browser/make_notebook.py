"""Write the notebooks the browser tests open: the explorer on the (untrained) seed net, and a
live training panel while fit runs in the same cell."""

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

IMAGE_CELLS = [
    "import os\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n%matplotlib widget",
    "import keras, numpy as np\nimport gradmagic as gm\n"
    "keras.utils.set_random_seed(0)\n"
    "model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation='tanh'),\n"
    "                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])\n"
    "images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype('float32')\n"
    "panel = gm.explore(model, images, steps=16)\npanel",
]

#: The image view on MobileNetV2 at 96x96 (random weights), for the browser benchmark.
MOBILENET_CELLS = [
    "import os\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n%matplotlib widget",
    "import keras, numpy as np\nimport gradmagic as gm\n"
    "keras.utils.set_random_seed(0)\n"
    "model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None)\n"
    "images = np.random.default_rng(0).uniform(-1, 1, size=(2, 96, 96, 3)).astype('float32')\n"
    "panel = gm.explore(model, images)\npanel",
]

TRAINING_CELLS = [
    "import os\nos.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n%matplotlib widget",
    "import keras, numpy as np\nimport gradmagic as gm\n"
    "keras.utils.set_random_seed(0)\n"
    "model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation='relu'),\n"
    "                          keras.layers.Dense(256, activation='relu'), keras.layers.Dense(10)])\n"
    "model.compile(optimizer='adam', loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))\n"
    "rng = np.random.default_rng(0)\n"
    "x, y = rng.normal(size=(8192, 784)).astype('float32'), rng.integers(0, 10, size=8192)\n"
    "monitor = gm.GradientMonitor()\n"
    "# A generous budget so that a short fit shows several frames.\n"
    "panel = gm.training_panel(monitor, every=20, min_interval=0.3, max_fraction=0.25)",
    "print('fit started', flush=True)\n"
    "model.fit(x, y, batch_size=32, epochs=12, verbose=0, callbacks=[monitor])\n"
    "print(f'fit done: {len(monitor.recorded)} steps, {panel.redraws} redraws', flush=True)",
]


def write(folder: Path, name: str = "explorer.ipynb", cells: list[str] = CELLS) -> int:
    """Write a notebook of ``cells`` (the explorer's by default); return its number of cells."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / name)
    return len(cells)
