"""The one door to the framework: the only modules that touch framework internals.

``tensorflow.py`` holds every use of a TensorFlow or Keras internal (a private
attribute, ``tensorflow.python``, a protobuf, a naming convention), each behind
one small function that says which public API is missing and what it falls back
to. The rest of the core calls those functions and never the internals.
"""
