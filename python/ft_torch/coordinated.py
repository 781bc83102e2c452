"""Opening this process's session: unprotected, local, or under a coordinator."""

from __future__ import annotations

import os
import sys

from . import _native
from .session import Local, Unprotected

CLIENT_ENVIRONMENT = ("FT_JOB_ID", "FT_WORKER_ID", "FT_DP_RANK", "FT_DP_SIZE", "FT_SMP_ENDPOINT")


def open_session(environment=os.environ):
    missing = [k for k in CLIENT_ENVIRONMENT if not environment.get(k)]
    if missing:
        return Unprotected(f"not started by ft-smp: missing {', '.join(missing)}")
    if not environment.get("FT_COORDINATOR_ENDPOINT"):
        return Local(_native.Client(), environment)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        raise RuntimeError("ft_torch.start() must come before torch.distributed.init_process_group: "
                           "each recovery rebuilds the process group with a new MASTER_PORT")
    from .agent import start_under_coordinator
    return start_under_coordinator(environment)
