"""fairseq models registered by the plugin."""

from . import laser, mt4ssl, score, spin, superb, wav2vec2_vgs  # noqa: F401
