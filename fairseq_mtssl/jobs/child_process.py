"""Child processes that die with their parent.

The main job, ``mtssl-evaluate-upstream`` and ``mtssl-vgs-train`` run ``fairseq-hydra-train`` and other
commands as child processes. If the parent is killed (``kill -9``, an OOM kill), an orphaned trainer
would go on writing into the run folder that the next run resumes from. On Linux each child asks the
kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); elsewhere nothing changes.
"""

import ctypes
import signal
import sys
from typing import Dict

PR_SET_PDEATHSIG = 1

if sys.platform.startswith("linux"):
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # bound before any fork: the child only calls it

    def _die_with_parent() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def child_kwargs() -> Dict:
        """Extra ``subprocess.Popen`` / ``run`` arguments: the child is killed when its parent dies."""
        return {"preexec_fn": _die_with_parent}
else:  # pragma: no cover

    def child_kwargs() -> Dict:
        return {}
