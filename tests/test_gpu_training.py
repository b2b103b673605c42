"""The GPU path of training (flex-attention block mask with its backward,
bf16 mixed precision on CUDA). Skipped on machines without CUDA; run these
on a GPU machine after changing the model, the packer or the trainer."""

from __future__ import annotations

import pytest
import torch

from openbagel.checkpoint import load_vae
from openbagel.train.packing import pack
from openbagel.train.step import compute_losses
from openbagel.train.trainer import new_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tests.test_trainer import CFG, SPECIAL, fixed_samples  # noqa: E402


def _loss_and_grads(device: str, tiny_dir):
    model = new_model(CFG, seed=3).to(device)
    vae = load_vae(tiny_dir).to(device)
    batch = pack(fixed_samples(), CFG, SPECIAL)
    losses = compute_losses(model, vae, batch, generator=torch.Generator().manual_seed(0))
    losses.total.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def test_flex_mask_training_matches_dense_cpu(tiny_dir):
    """On CUDA the packed batch uses a flex-attention block mask; its loss and
    gradients equal the CPU dense-mask path."""
    cpu, g_cpu = _loss_and_grads("cpu", tiny_dir)
    gpu, g_gpu = _loss_and_grads("cuda", tiny_dir)
    assert gpu.ce.item() == pytest.approx(cpu.ce.item(), rel=1e-3)
    assert gpu.mse.item() == pytest.approx(cpu.mse.item(), rel=1e-3)
    assert g_cpu.keys() == g_gpu.keys()
    for name in g_cpu:
        torch.testing.assert_close(g_gpu[name], g_cpu[name], rtol=1e-2, atol=1e-4, msg=name)


def test_bf16_cuda_run_follows_fp32_cpu(tmp_path, tiny_dir):
    import json

    from typer.testing import CliRunner

    from openbagel.cli import app
    from tests.test_train_run import _config

    logs = {}
    for name, extra in (("cpu", {"device": "cpu"}), ("cuda", {"device": "cuda", "precision": "bf16"})):
        cfg = _config(tmp_path, tiny_dir, optim={"max_steps": 3, "lr": 1e-3}, **extra)
        r = CliRunner().invoke(app, ["train", str(cfg), "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        logs[name] = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    for a, b in zip(logs["cpu"], logs["cuda"], strict=True):
        assert b["loss_ce"] == pytest.approx(a["loss_ce"], rel=3e-2)
        assert b["loss_mse"] == pytest.approx(a["loss_mse"], rel=3e-2)
