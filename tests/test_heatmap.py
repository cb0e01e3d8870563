"""The inline heat maps of the attribution results: valid PNGs with the documented colours."""

from __future__ import annotations

import base64
import io
import re

import keras
import numpy as np
from PIL import Image

import gradmagic as gm
from gradmagic.core.questions.attribution.heatmap import MAX_SAMPLES, colours, png, strip


def test_png_decodes_to_the_pixels_written():
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png(rgb))).convert("RGB"))
    np.testing.assert_array_equal(decoded, rgb)


def test_colours_run_blue_white_red_scaled_to_the_largest_value():
    got = colours(np.array([[-2.0, 0.0, 2.0, 1.0]]), signed=True)[0]
    np.testing.assert_array_equal(got[:3], [[0, 0, 255], [255, 255, 255], [255, 0, 0]])
    np.testing.assert_array_equal(got[3], [255, 128, 128])  # half of the largest value: half-way to red
    unsigned = colours(np.array([[0.0, 4.0]]), signed=False)[0]
    np.testing.assert_array_equal(unsigned, [[255, 255, 255], [255, 0, 0]])


def test_strip_shows_at_most_the_first_samples_and_skips_other_shapes():
    html = strip(np.random.default_rng(1).normal(size=(10, 4, 6)), signed=True, label="maps")
    assert html.count("<img") == MAX_SAMPLES and f"first {MAX_SAMPLES} of 10" in html
    assert strip(None, signed=True, label="maps") == ""
    assert "&lt;b&gt;" in strip(np.ones((1, 2, 2)), signed=False, label="<b>")  # a layer name is text, not markup


def test_results_of_image_models_render_their_maps():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    x = np.random.default_rng(2).random((2, 6, 6, 3)).astype("float32")
    a = gm.integrated_gradients(model, x, steps=40)
    for result in (a, gm.saliency(model, x), gm.gradcam(model, x, "conv")):
        images = re.findall(r'src="data:image/png;base64,([^"]+)"', result._repr_html_())
        assert len(images) == 2
        assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (6, 6)
    # The attribution image is the channel sum of sample 0's map, in the documented colours.
    first = re.findall(r'src="data:image/png;base64,([^"]+)"', a._repr_html_())[0]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(first))).convert("RGB"))
    np.testing.assert_array_equal(decoded, colours(a.array[0].sum(axis=-1), signed=True))
