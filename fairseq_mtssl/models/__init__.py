"""fairseq models registered by the plugin."""

from . import laser, mt4ssl, score, superb, wav2vec2_vgs  # noqa: F401
