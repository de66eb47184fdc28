"""One rank of the two-node run of ``test_mesh.py``, started by two ``torchrun --nnodes 2``.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:PORT --rdzv-id ID tests/nodes_worker.py OUT_DIR

Runs the ``"ddp"`` and ``"hsdp"`` scenarios of ``mesh_workers`` on the 4 ranks
(HSDP: replicate across the nodes, shard within each) and saves, per scenario
and rank, what ``mesh_workers.run`` records, plus the node (``GROUP_RANK``).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mesh_workers import MeshScenario, run  # the script's directory is on sys.path

SCENARIOS = {"nodes-ddp": MeshScenario("ddp"), "nodes-hsdp": MeshScenario("hsdp")}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        for name, scenario in SCENARIOS.items():
            record = run(scenario, rank)
            record["node"] = [int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])]
            torch.save(record, out_dir / f"{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
