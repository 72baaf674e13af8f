"""fairseq criterions registered by the plugin."""

from . import laser_criterion, mt4ssl_criterion, score_criterion, spin_criterion, superb_ctc, vgs_criterion  # noqa: F401
