"""fairseq criterions registered by the plugin."""

from . import mt4ssl_criterion, score_criterion  # noqa: F401
