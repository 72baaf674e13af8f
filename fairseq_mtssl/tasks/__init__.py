"""fairseq tasks registered by the plugin."""

from . import hubert_pretraining_checked  # noqa: F401
