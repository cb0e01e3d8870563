"""GradientMonitor: capture in the train step, on-device statistics, buffers,
history, anomalies, histograms.

- ``callback``: the Keras callback (``GradientMonitor``); ``arguments``: its checks;
  ``session``: the state of one ``fit``.
- ``functions``: the plain and the recording train function, swapped per ``fit``;
  ``capture``: the recording ``optimizer.apply`` and the statistics buffer;
  ``replay``: reading a gradient without changing how its update is compiled.
- ``stats``: the on-device statistics; ``columns``: their layout, by name;
  ``variables``: the monitor's device variables; ``histograms``: gradient histograms.
- ``history``: what was recorded, its summary and printed lines; ``anomaly``:
  non-finite, exploding and vanishing gradients; ``bad_step`` and ``origin``: the
  first non-finite step's batch and the op that made NaN/Inf first.

Nothing is re-exported here: :mod:`gradmagic.core` is the one public door.
"""
