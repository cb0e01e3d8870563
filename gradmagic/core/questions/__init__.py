"""The three gradient questions: inputs and targets, layers and losses, the
compiled-function cache, the state guard and the result objects.

Nothing is re-exported here: :mod:`gradmagic.core` is the one public door.
"""
