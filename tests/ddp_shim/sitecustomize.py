"""Loaded by the two-rank tests (tests/integration/test_ddp.py) through PYTHONPATH, in each fairseq-hydra-train rank.

- ``MTSSL_TEST_RANK_DIGEST=DIR``: after every update each rank writes ``DIR/rank{R}.json`` with the
  update count and a digest of its parameters, so the test can see that the ranks stay equal.
- ``MTSSL_TEST_CPU_GATHER=1``: fairseq's ``all_gather_list`` (used by criteria whose logging outputs
  cannot be summed: fairseq's ``hubert``) allocates a CUDA buffer; this replaces it with
  ``torch.distributed.all_gather_object`` so such a criterion can run under gloo on a CPU. Only the
  test sets it: on GPUs fairseq's own path is used.
"""

import os

if os.environ.get("MTSSL_TEST_RANK_DIGEST") or os.environ.get("MTSSL_TEST_CPU_GATHER"):
    import hashlib
    import json

    import torch.distributed as dist
    from fairseq import trainer as _trainer
    from fairseq.distributed import utils as _dist_utils

    if os.environ.get("MTSSL_TEST_CPU_GATHER"):

        def _all_gather_list_cpu(data, group=None, max_size=16384):
            out = [None] * dist.get_world_size(group=group)
            dist.all_gather_object(out, data, group=group)
            return out

        _dist_utils.all_gather_list = _all_gather_list_cpu

    if os.environ.get("MTSSL_TEST_RANK_DIGEST"):
        _train_step = _trainer.Trainer.train_step

        def _train_step_with_digest(self, *args, **kwargs):
            out = _train_step(self, *args, **kwargs)
            h = hashlib.sha1()
            for name, p in sorted(self.model.named_parameters()):
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().numpy().tobytes())
            record = {
                "rank": self.data_parallel_rank,
                "world": self.data_parallel_world_size,
                "updates": self.get_num_updates(),
                "digest": h.hexdigest(),
            }
            path = os.path.join(os.environ["MTSSL_TEST_RANK_DIGEST"], f"rank{self.data_parallel_rank}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(path + ".tmp", path)
            return out

        _trainer.Trainer.train_step = _train_step_with_digest
