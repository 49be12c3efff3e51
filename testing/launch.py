"""Launching the processes of a test or a benchmark: torchrun jobs on a local rendezvous."""
from __future__ import annotations

import sys

from .store_proxy import free_port


def torchrun(nproc: int, *, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    """The command line of a torchrun job on a local rendezvous (a free port unless given: the
    nodes of one job share theirs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
