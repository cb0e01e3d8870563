"""Diagnosis: explain (gradient path, NaN/Inf origin) and check_gradients
(finite differences, float64 copy).

Nothing is re-exported here: :mod:`gradmagic.core` is the one public door.
"""
