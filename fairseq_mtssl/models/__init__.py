"""fairseq models registered by the plugin."""

from . import mt4ssl, score  # noqa: F401
