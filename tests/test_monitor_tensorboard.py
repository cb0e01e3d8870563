"""The monitor writes TensorBoard event files: norms and histograms, under the plugins TensorBoard reads."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from conftest import mlp
from monitor_helpers import sample_data

from gradmagic.core.monitor.callback import GradientMonitor


def test_tensorboard_export(tmp_path):
    model, (x, y) = mlp(), sample_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[GradientMonitor(log_dir=str(tmp_path))])
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert f"gradient_norm/{model.trainable_variables[0].path}" in tags


def test_tensorboard_histograms(tmp_path):
    model, (x, y) = mlp(), sample_data()
    monitor = GradientMonitor(log_dir=str(tmp_path), histogram_every=2, histogram_bins=5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    (events,) = tmp_path.glob("events.out.tfevents.*")
    tag = f"gradient/{model.trainable_variables[0].path}"
    found = [
        (e.step, tf.make_ndarray(v.tensor), v.metadata.plugin_data.plugin_name)
        for e in tf.compat.v1.train.summary_iterator(str(events))
        for v in e.summary.value
        if v.tag == tag
    ]
    assert [step for step, _, _ in found] == [0]  # 2 batches: step 0 only
    _, buckets, plugin = found[0]
    assert plugin == "histograms" and buckets.shape == (5, 3)
    assert buckets[:, 2].sum() == model.trainable_variables[0].numpy().size
    np.testing.assert_allclose(buckets[1:, 0], buckets[:-1, 1])  # contiguous bins
