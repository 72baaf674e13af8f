"""fairseq models registered by the plugin."""

from . import mt4ssl  # noqa: F401
