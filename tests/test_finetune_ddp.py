"""DDP on CPU: two torchrun processes (gloo) give the gradients one process computes on the
same data (the mean of the two halves' losses: each process scores its queries against its own
passages, as FlagEmbedding's unified fine-tuning does without cross-device negatives)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3connect.encoder import M3Encoder
from m3connect.finetune import M3TrainModel, unified_loss

HERE = Path(__file__).resolve().parent
GROUP = 2
HALVES = [
    {
        "queries": ["What is the capital of France?", "How many people live in Seoul?"],
        "passages": [
            "Paris is the capital of France.",
            "Seoul is a large city.",
            "About ten million people live in Seoul.",
            "Berlin is the capital of Germany.",
        ],
    },
    {
        "queries": ["dense retrieval with one vector", "sparse lexical weights"],
        "passages": [
            "Dense retrieval encodes the query into one vector.",
            "北京是中国的首都",
            "Sparse retrieval gives each token a weight.",
            "the the the repeated tokens",
        ],
    },
]


def _torchrun(tmp_path: Path, script: Path, *args: str) -> tuple[int, str]:
    """``torchrun --standalone --nproc-per-node 2 script args``; the whole process group is
    killed if it hangs."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), *args]
    with subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"torchrun did not finish in 240 s:\n{output[-3000:]}")
    return process.returncode, output


@pytest.mark.slow
def test_two_processes_give_the_gradients_of_one(tmp_path: Path, m3_checkpoint: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"group_size": GROUP, "halves": HALVES}))
    code, output = _torchrun(
        tmp_path, HERE / "finetune_ddp_worker.py", str(m3_checkpoint), str(data), str(tmp_path)
    )
    assert code == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"grads-{r}.pt", weights_only=True) for r in (0, 1)]

    model = M3TrainModel.from_encoder(M3Encoder.from_pretrained(m3_checkpoint, device="cpu"))
    model.requires_grad_(True)
    model.model.pooler.requires_grad_(False)
    losses = [
        unified_loss(model, h["queries"], h["passages"], group_size=GROUP).total for h in HALVES
    ]
    ((losses[0] + losses[1]) / 2).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert [r["loss"] for r in ranks] == pytest.approx(
        [float(v.detach()) for v in losses], rel=1e-5
    )
    assert losses[0].item() != pytest.approx(losses[1].item(), rel=1e-3)  # the halves differ
    for rank in ranks:
        assert rank["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_finetune_command_runs_under_torchrun(tmp_path: Path, m3_checkpoint: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"query": f"q{i} topic{i}", "pos": [f"topic{i} text"], "neg": [f"n{i}"]})
            + "\n"
            for i in range(10)
        )
    )
    out = tmp_path / "out"
    code, output = _torchrun(
        tmp_path,
        HERE.parent / "m3connect" / "__main__.py",
        "finetune", str(data), "--model", str(m3_checkpoint), "--output", str(out),
        "--group-size", "2", "--batch-size", "2", "--lr", "1e-3", "--no-progress",
    )  # fmt: skip
    assert code == 0, output[-3000:]
    log = (out / "train.log").read_text()
    # 10 examples in batches of 2 = 5 batches; 2 per process, the odd one left out.
    assert "2 process(es)" in log and "step 2/2" in log
    tuned = M3Encoder.from_pretrained(out, device="cpu")
    base = M3Encoder.from_pretrained(m3_checkpoint, device="cpu")
    assert tuned.fingerprint.heads_sha256 != base.fingerprint.heads_sha256
