"""Run by tests/test_finetune_ddp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): each
process computes unified_loss on its half of the data through DistributedDataParallel, and
writes the synchronised gradients to ``OUT/grads-RANK.pt``.

Usage: torchrun --nproc-per-node 2 tests/finetune_ddp_worker.py CHECKPOINT DATA.json OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from m3connect.encoder import M3Encoder
from m3connect.finetune import M3TrainModel, unified_loss


def main() -> None:
    checkpoint, data_path, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    data = json.loads(data_path.read_text())
    model = M3TrainModel.from_encoder(M3Encoder.from_pretrained(checkpoint, device="cpu"))
    model.requires_grad_(True)
    model.model.pooler.requires_grad_(False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = data["halves"][rank]
    loss = unified_loss(ddp, half["queries"], half["passages"], group_size=data["group_size"])
    loss.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": float(loss.total.detach()), "grads": grads}, out / f"grads-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
