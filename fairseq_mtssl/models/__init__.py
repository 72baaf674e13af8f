"""fairseq models registered by the plugin."""

from . import mt4ssl, score, superb, wav2vec2_vgs  # noqa: F401
