"""Optimisation components the plugin registers with fairseq."""

from . import lr_scheduler  # noqa: F401  (registration side effect)
