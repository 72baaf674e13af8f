"""fairseq criterions registered by the plugin."""

from . import mt4ssl_criterion, score_criterion, superb_ctc, vgs_criterion  # noqa: F401
