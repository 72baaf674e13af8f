"""fairseq models registered by the plugin."""

from . import mt4ssl, score, superb  # noqa: F401
