"""The fused loss under real DeepSpeed ZeRO-3 (2 CPU ranks, gloo, every parameter partitioned).

A tiny LM (embedding -> linear -> lm_head) whose forward calls fused_gdkd_ce with its own
lm_head.weight, as engine.student.StudentWithLoss does. Each rank gets a different batch; the
per-rank loss must equal the single-process loss on that batch and the gathered lm_head / linear
gradients must equal the mean of the single-process gradients. The known failure is shown too: the
weight read where ZeRO-3 has not gathered it (a loss computed after the model's forward, the
HF-Trainer + fused-loss-library pattern) is an empty shard, which fused_gdkd_ce refuses.
DeepSpeed 0.19 also auto-registers parameters read inside the root module's forward, so an
unregistered read *inside* the forward happens to work on this version; the explicit registration
does not rely on that heuristic (older versions lack it; see grace_ds/distill/zero3.py).

The heavy modules deepspeed.initialize pulls in lazily (torch._dynamo via the optimizer checks,
ZeRO-3) are imported here, in the parent: forked ranks then start in ~1 s instead of ~15 s each.
"""

import deepspeed
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
import deepspeed.runtime.zero.stage3  # noqa: F401
import pytest
import torch
import torch._dynamo  # noqa: F401
from distributed import run_distributed
from torch import nn

from grace_ds.distill import fused_gdkd_ce, register_head_for_loss
from grace_ds.distill.zero3 import is_partitioned

V, H, VT, HT, B, S = 64, 16, 72, 24, 2, 9

pytestmark = pytest.mark.slow


class TinyLMWithLoss(nn.Module):
    def __init__(self, register: bool = True):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.proj = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=False)
        if register:
            register_head_for_loss(self, self.lm_head.weight)

    def forward(self, input_ids, labels, teacher_hidden, teacher_weight):
        h = torch.tanh(self.proj(self.embed(input_ids)))
        # lm_head's own forward never runs: only the registration makes ZeRO-3 gather its weight here
        # and again in backward, where the fused loss recomputes the logits.
        out = fused_gdkd_ce(h, self.lm_head.weight, teacher_hidden, teacher_weight, labels, chunk_size=5)
        return out.ce + 0.7 * out.gdkd


def _batch(seed):
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    th = torch.randn(B, S, HT, generator=g)
    tw = torch.randn(VT, HT, generator=g) * 0.5
    return dict(input_ids=ids, labels=labels, teacher_hidden=th, teacher_weight=tw)


def _model(register=True):
    torch.manual_seed(0)
    return TinyLMWithLoss(register)


def _single_process(seed):
    m = _model()
    loss = m(**_batch(seed))
    loss.backward()
    return loss.item(), m.lm_head.weight.grad.clone(), m.proj.weight.grad.clone()


def _zero3_body(rank, world_size):
    from deepspeed.utils import safe_get_full_grad

    model = _model()
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    head = engine.module.lm_head.weight
    partitioned_before = is_partitioned(head)
    loss = engine(**_batch(rank))
    engine.backward(loss)
    g_head = safe_get_full_grad(head).clone()
    g_proj = safe_get_full_grad(engine.module.proj.weight).clone()
    # Outside the owner's forward the weight is an empty shard: a loss computed there (the
    # "model(...) then fused loss on model.lm_head.weight" pattern) is refused with the fix named.
    shard_numel = head.numel()
    try:
        fused_gdkd_ce(torch.randn(B, S, H), head, None, None, _batch(rank)["labels"])
        refused = ""
    except ValueError as e:
        refused = str(e)
    # Calling the module directly (not through engine(...)) also sees the gathered weight.
    with torch.no_grad():
        loss_direct = engine.module(**_batch(rank)).item()
    registered = id(head) in engine.module._external_params
    return dict(loss=loss.item(), g_head=g_head, g_proj=g_proj, partitioned=partitioned_before,
                shard_numel=shard_numel, refused=refused, loss_direct=loss_direct, registered=registered)


def test_fused_loss_under_zero3_matches_single_process():
    ref = [_single_process(r) for r in range(2)]
    res = run_distributed(_zero3_body, world_size=2, timeout=300)
    for r in range(2):
        assert res[r]["partitioned"], "persistence threshold 0 must partition lm_head (else the test is void)"
        assert res[r]["loss"] == pytest.approx(ref[r][0], rel=1e-6)
        # DeepSpeed averages gradients over ranks: the mean of the two single-process gradients.
        torch.testing.assert_close(res[r]["g_head"], (ref[0][1] + ref[1][1]) / 2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res[r]["g_proj"], (ref[0][2] + ref[1][2]) / 2, rtol=1e-5, atol=1e-7)
        assert res[r]["shard_numel"] == 0
        assert "ZeRO-3 partition" in res[r]["refused"] and "register_head_for_loss" in res[r]["refused"]
        assert res[r]["loss_direct"] == pytest.approx(ref[r][0], rel=1e-6)
        assert res[r]["registered"]


def test_register_head_for_loss_rejects_foreign_or_derived_weights():
    m = TinyLMWithLoss(register=False)
    with pytest.raises(TypeError, match="nn.Parameter itself"):
        register_head_for_loss(m, m.lm_head.weight.detach())
    with pytest.raises(ValueError, match="not a parameter of `owner`"):
        register_head_for_loss(nn.Linear(2, 2), m.lm_head.weight)
    assert register_head_for_loss(m, m.lm_head.weight) is True
    assert id(m.lm_head.weight) in m._external_params
