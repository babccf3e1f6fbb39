"""Streaming detector of LLM distillation attacks.

The flow, and the layout that follows it::

    schemas -> features -> models -> detection -> streaming / cli

Only ``detector.streaming`` imports Faust; everything before it is plain Python, so the Faust worker and
``detector replay`` run the very same detection code.
"""

__version__ = "0.1.0"
