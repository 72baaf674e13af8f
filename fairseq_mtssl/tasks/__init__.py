"""fairseq tasks registered by the plugin."""

from . import hubert_pretraining_checked, score_finetuning, spin_finetuning, superb_downstream, vgs_pretraining  # noqa: F401
