"""prepare_qat under real ZeRO-3 (2 CPU ranks, gloo) on a tiny Qwen2-VL.

The trap this guards against (grace-method.md section 4): under ZeRO-3 a weight outside forward is
an empty shard; scales initialised from it are wrong (theta = 0) and training starts at loss ~60.
Both ways a model reaches ZeRO-3 are covered: built normally then partitioned by
deepspeed.initialize, and built under deepspeed.zero.Init (partitioned before prepare_qat runs).
Each must give, after deepspeed.initialize, exactly the single-process scales and integer export,
the same first-step loss and (fp32) the same gradients.
"""

import pytest
import torch
import deepspeed  # imported here so the forked ranks start with it loaded
import transformers
from deepspeed.utils import safe_get_full_grad

from distributed import preload_deepspeed, run_distributed
from grace_ds.quant import QuantConfig, export_int_weights, init_log_scale, prepare_qat, scale_param_groups
from test_quant import QWEN_DECODER_LINEARS, tiny_qwen2vl, tiny_qwen2vl_config
from transformers.integrations import HfDeepSpeedConfig

pytestmark = pytest.mark.slow

WORLD = 2
MICRO = 2          # sequences per rank
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": 1,
    # threshold 0: every parameter, the small log-scales included, is really partitioned
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}
# layers whose latent-weight gradient is compared too (the log-scales are compared for all)
WEIGHT_GRAD_LAYERS = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.down_proj"]


def _batch():
    return torch.randint(0, 400, (WORLD * MICRO, 16), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def preloaded():
    # in a fixture, not at import: collecting this module (e.g. under -k) must not pay for it
    preload_deepspeed()


@pytest.fixture(scope="module")
def reference():
    return _reference(torch.float32)


@pytest.fixture(scope="module")
def reference_bf16():
    return _reference(torch.bfloat16)


def _reference(dtype):
    """Single process: scales, per-rank losses and the rank-averaged gradients (what ZeRO reduces).
    bf16: DeepSpeed holds every parameter in bf16, log-scales included, so the reference rounds its
    fp32 log-scales to bf16 too (the scales then agree exactly, not just closely)."""
    model = tiny_qwen2vl(seed=0, dtype=dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = prepare_qat(model, QuantConfig())
    for q in replaced.values():
        q.log_scale.data = q.log_scale.data.to(dtype)
    batch = _batch()
    losses = [model(input_ids=batch[r * MICRO:(r + 1) * MICRO], labels=batch[r * MICRO:(r + 1) * MICRO]).loss
              for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    ints = export_int_weights(model)
    return {
        "ints": {n: ints[n] for n in WEIGHT_GRAD_LAYERS},
        "state": state,
        "scales": {n: q.log_scale.detach().clone() for n, q in replaced.items()},
        "losses": [float(x.detach()) for x in losses],
        "scale_grads": {n: q.log_scale.grad.clone() for n, q in replaced.items()},
        "weight_grads": {n: replaced[n].weight.grad.clone() for n in WEIGHT_GRAD_LAYERS},
    }


def _rank_body(rank, world_size, mode, state):
    bf16 = mode.endswith("bf16")
    config = {**DS_CONFIG, "bf16": {"enabled": bf16}}
    dtype = torch.bfloat16 if bf16 else torch.float32
    if mode.startswith("zero_init"):
        # transformers' own zero.Init path (what from_pretrained uses); keep the object alive
        hf_ds = HfDeepSpeedConfig(config)  # noqa: F841
        torch.manual_seed(1)               # another seed: the values come from `state` below
        model = transformers.Qwen2VLForConditionalGeneration._from_config(tiny_qwen2vl_config(), dtype=dtype)
        assert all(hasattr(p, "ds_id") for p in model.parameters())
        params = dict(model.named_parameters())
        for name, p in params.items():   # what from_pretrained does under zero.Init: rank 0 writes, then re-partition
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(state[name])
    else:
        model = tiny_qwen2vl(seed=0, dtype=dtype)
    replaced = prepare_qat(model, QuantConfig())
    if mode.startswith("zero_init"):   # partitioned straight away, like the weights it sits next to
        assert all(hasattr(q.log_scale, "ds_id") and q.log_scale.numel() == 0 for q in replaced.values())
    optimizer = torch.optim.AdamW(scale_param_groups(model, lr=1e-3, weight_decay=0.0))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    out = {"scales": {}, "partitioned": True, "shard_init_raises": False}
    for name, q in replaced.items():
        out["partitioned"] &= q.log_scale.numel() == 0 and q.weight.numel() == 0
        with deepspeed.zero.GatheredParameters([q.log_scale]):
            out["scales"][name] = q.log_scale.detach().clone()
    try:      # negative control: the shard itself is not a weight (the trap is real here)
        init_log_scale(replaced[WEIGHT_GRAD_LAYERS[0]].weight)
    except ValueError:
        out["shard_init_raises"] = True

    ints = export_int_weights(model)       # gathers layer by layer: a collective on every rank
    out["ints"] = {n: ints[n] for n in WEIGHT_GRAD_LAYERS}
    out["ints_layers"] = set(ints)

    batch = _batch()[rank * MICRO:(rank + 1) * MICRO]
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    out["loss"] = float(loss.detach())
    if bf16:   # gradients of a bf16 run are not compared (reduction order moves bf16 roundings)
        engine.step()
        return out
    out["scale_grads"] = {n: safe_get_full_grad(q.log_scale).clone() for n, q in replaced.items()}
    out["weight_grads"] = {n: safe_get_full_grad(replaced[n].weight).clone() for n in WEIGHT_GRAD_LAYERS}
    engine.step()
    return out


@pytest.mark.parametrize("mode", ["plain", "zero_init", "plain_bf16", "zero_init_bf16"])
def test_zero3_scales_loss_and_grads_match_single_process(mode, request, preloaded):
    reference = request.getfixturevalue("reference_bf16" if mode.endswith("bf16") else "reference")
    results = run_distributed(_rank_body, world_size=WORLD, args=(mode, reference["state"]), timeout=180)
    for rank, out in enumerate(results):
        assert out["partitioned"] and out["shard_init_raises"]
        assert set(out["scales"]) == QWEN_DECODER_LINEARS
        for name, ref in reference["scales"].items():
            assert torch.equal(out["scales"][name], ref), (rank, name)
        assert out["ints_layers"] == QWEN_DECODER_LINEARS
        for name, ref in reference["ints"].items():
            got = out["ints"][name]
            assert torch.equal(got["codes"], ref["codes"]) and torch.equal(got["scales"], ref["scales"]), (rank, name)
            assert got["group_size"] == ref["group_size"] and got["bits"] == ref["bits"]
        torch.testing.assert_close(out["loss"], reference["losses"][rank], rtol=1e-6, atol=1e-6)
        if mode.endswith("bf16"):
            continue
        for name, ref in reference["scale_grads"].items():
            torch.testing.assert_close(out["scale_grads"][name], ref, rtol=1e-4, atol=1e-7)
        for name, ref in reference["weight_grads"].items():
            torch.testing.assert_close(out["weight_grads"][name], ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# the rank runner itself (tests/distributed.py), which other parts' tests rely on
# ---------------------------------------------------------------------------------------------

def _allreduce_rank(rank, world_size, base):
    import os

    t = torch.tensor([float(base + rank)])
    torch.distributed.all_reduce(t)
    return rank, world_size, int(os.environ["LOCAL_RANK"]), float(t)


def _failing_rank(rank, world_size):
    if rank == 1:
        raise KeyError("rank one is broken")
    torch.distributed.barrier()       # rank 0 waits for a peer that never comes


def _sleeping_rank(rank, world_size):
    if rank == 1:
        import time

        time.sleep(60)
    return rank


def test_run_distributed_results_errors_and_timeout():
    from distributed import DistributedError

    assert run_distributed(_allreduce_rank, world_size=2, args=(10,)) == [(0, 2, 0, 21.0), (1, 2, 1, 21.0)]
    with pytest.raises(DistributedError, match=r"(?s)--- rank 1 ---.*KeyError: 'rank one is broken'"):
        run_distributed(_failing_rank, world_size=2, timeout=60)
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 3 s"):
        run_distributed(_sleeping_rank, world_size=2, timeout=3)
