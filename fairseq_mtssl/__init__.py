"""fairseq-mtssl: a fairseq plugin for multi-task self-supervised speech learning.

Loading the package (``common.user_dir=/path/to/fairseq_mtssl`` or ``import fairseq_mtssl``)
registers its tasks, models and criterions with fairseq and allowlists the plain-data classes that
fairseq checkpoints pickle, so ``torch.load(weights_only=True)`` can read them.
"""

import logging

# fairseq logs an INFO line about tensorboardX on every import; it says nothing about this plugin.
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

from .checkpoint_safety import allow_fairseq_checkpoint_classes  # noqa: E402

allow_fairseq_checkpoint_classes()

from . import criterions, models, optim, tasks  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
