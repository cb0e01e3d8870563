"""GradientMonitor: capture in the train step, on-device statistics, buffers,
history, anomalies, histograms.

Nothing is re-exported here: :mod:`gradmagic.core` is the one public door.
"""
