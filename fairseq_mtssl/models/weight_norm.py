"""Deep-copying fairseq models that use weight norm (``pos_conv``) under torch >= 2.1."""

import torch.nn as nn
from torch.nn.utils.weight_norm import WeightNorm


def detach_weight_norm_weights(model: nn.Module) -> None:
    """Make ``model`` deep-copyable: weight norm keeps its derived ``weight`` as a non-leaf tensor,
    which torch >= 2.1 refuses to deepcopy (so fairseq's data2vec cannot build its EMA teacher). The
    weight-norm hook recomputes it before every forward, so a detached tensor is equivalent."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                setattr(module, hook.name, getattr(module, hook.name).detach())
