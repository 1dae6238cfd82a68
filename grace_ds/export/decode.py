"""Greedy decoding with a static KV cache and a graph-capturable decode step (used by launch/bench.py).

Checked against `model.generate(do_sample=False)` for LLaVA and Qwen2-VL in tests/test_export.py.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def chunked_language_model(lm, chunk: int | None):
    """Run the language model's prompt pass `chunk` tokens at a time (chunked prefill).

    The VLM's own forward still builds the whole prompt's embeddings (vision tower included) and
    position ids. Only the decoder layers, whose activations grow with batch x prompt (the MLP's
    intermediate alone is 0.4 GB for 16 x 642 tokens on Qwen2-VL-7B), see one chunk at a time,
    each attending to the cache written by the chunks before it. The model returns the last
    chunk's hidden states, which is all a prefill with logits_to_keep=1 reads.
    """
    if not chunk:
        yield
        return
    orig = lm.forward

    def forward(*args, inputs_embeds=None, position_ids=None, attention_mask=None, cache_position=None, **kw):
        n = None if inputs_embeds is None else inputs_embeds.shape[1]
        if args or n is None or n <= chunk or (attention_mask is not None and attention_mask.dim() != 2):
            return orig(*args, inputs_embeds=inputs_embeds, position_ids=position_ids,
                        attention_mask=attention_mask, cache_position=cache_position, **kw)
        out = None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            out = orig(inputs_embeds=inputs_embeds[:, a:b],
                       position_ids=None if position_ids is None else position_ids[..., a:b],
                       attention_mask=None if attention_mask is None else attention_mask[:, :b],
                       cache_position=None if cache_position is None else cache_position[a:b], **kw)
        return out

    lm.forward = forward
    try:
        yield
    finally:
        del lm.forward


def chunk_for_budget(batch: int, prompt_len: int, budget: int | None) -> int | None:
    """Prompt tokens per row and language-model pass for a budget of `budget` tokens per pass over all
    rows (the token budget of serving engines' chunked prefill): None (one pass) when the whole
    prompt fits, else budget // batch (at least 1). A batch of 1 keeps its one fast pass while a
    batch of 16 is chunked, which one fixed chunk size cannot do."""
    if budget is None or batch * prompt_len <= budget:
        return None
    return max(1, budget // batch)


_WARMUP_STREAMS: dict = {}


def _warmup_stream(device) -> "torch.cuda.Stream":
    """One side stream per device for every capture's warm-up. Why not a fresh stream each time: cuBLAS
    keeps a workspace per (handle, stream) for the life of the process (32 MiB each on Hopper), so a fresh
    stream per capture leaked one per decoder (H200, 2026-11-30 00:10: tiny LLaVA at batch 4 peaked 32 MiB
    higher after a batch-1 capture in the same process than alone)."""
    key = torch.device(device)
    if key not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[key] = torch.cuda.Stream(device=key)
    return _WARMUP_STREAMS[key]


class StaticDecoder:
    """Greedy decoding over a StaticCache with the decode step as one replayable unit.

    The step runs the language model on one token per row with explicit position ids (LLaVA: the
    cache position; Qwen2-VL: cache position + the M-RoPE delta computed at prefill, for all three
    sections), then lm_head + argmax, and writes the next token into its own input buffer and into
    the output buffer: all state lives in device tensors, so a CUDA graph of it can be replayed.
    """

    def __init__(self, model, config, batch, max_len, device, kv_int8: bool = False, decode_kernel16: bool = False):
        """kv_int8: keep the KV cache in int8 (grace_ds.export.kv8; switches the language model's
        attention to the function that reads it). decode_kernel16: with the 16-bit cache, decode
        steps use the same Triton split-K kernel (kv8.enable_decode16) instead of transformers' SDPA."""
        from transformers import StaticCache

        self.model, self.config, self.device = model, config, device
        self.family = config.model_type
        if kv_int8:
            from grace_ds.export.kv8 import Int8StaticCache, enable_kv_int8

            enable_kv_int8(model)
            self.cache = Int8StaticCache(config=model.config, max_cache_len=max_len)
        else:
            if decode_kernel16:
                from grace_ds.export.kv8 import enable_decode16

                enable_decode16(model)
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.lm = model.model.language_model
        self.head = model.lm_head
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((3, batch, 1) if self.family != "llava" else (batch, 1), dtype=torch.long, device=device)
        self.out = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.compiled = None
        # a list to record, at each eager step, the top logit and its gap to the second per row (how close a
        # tie the argmax was; launch/bench.py reads it when replayed tokens differ from eager ones); None
        # (default, and whenever the step is compiled or captured): nothing recorded, nothing extra run
        self.margins: list[torch.Tensor] | None = None

    def prefill(self, inputs, chunk: int | None = None) -> None:
        """Run the prompt, write the cache and the first token. chunk: prompt tokens per pass of the
        language model (chunked prefill, less activation memory); None = the whole prompt at once."""
        self.cache.reset()
        if hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = None
        with chunked_language_model(self.lm, chunk):
            out = self.model(**inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        s = inputs["input_ids"].shape[1]
        self.tok.copy_(nxt[:, None])
        if self.family == "llava":
            self.pos.fill_(s)
        else:
            delta = self.model.model.rope_deltas.reshape(-1, 1).to(self.device)  # (B, 1)
            self.pos.copy_((s + delta)[None].expand_as(self.pos))
        self.out.zero_()
        self.out[:, 0] = nxt
        self.step_idx.fill_(1)

    def step(self) -> None:
        h = self.lm(input_ids=self.tok, position_ids=self.pos, past_key_values=self.cache,
                    use_cache=True).last_hidden_state
        logits = self.head(h[:, -1])
        nxt = logits.argmax(-1)
        if self.margins is not None:
            top2 = logits.float().topk(2, dim=-1).values
            self.margins.append(torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1]], 1))   # (rows, 2)
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.out.index_copy_(1, self.step_idx, nxt[:, None])
        self.step_idx.add_(1)

    def _state(self):
        lens = [layer.cumulative_length.clone() for layer in self.cache.layers]
        return [self.tok.clone(), self.pos.clone(), self.out.clone(), self.step_idx.clone(), lens]

    def _restore(self, st):
        self.tok.copy_(st[0]); self.pos.copy_(st[1]); self.out.copy_(st[2]); self.step_idx.copy_(st[3])
        for layer, n in zip(self.cache.layers, st[4]):
            layer.cumulative_length.copy_(n)

    def _step_fn(self):
        return self.compiled if self.compiled is not None else self.step

    def capture(self, warmup: int = 2) -> None:
        """CUDA-graph the step (after `prefill`): warm up on a side stream, restore the state, capture.
        After `compile()` the compiled step is captured (its first warm-up call compiles it)."""
        fn = self._step_fn()
        st = self._state()
        s = _warmup_stream(self.tok.device)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self._restore(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        self._restore(st)  # capture does not run kernels, but keep the state exact regardless
        self.graph = g

    def compile(self, pdl: bool = False) -> None:
        """Inductor-compile the step (fuses the norms, rotary, residuals and cache writes around the
        matmuls). No inductor CUDA graphs ("reduce-overhead"): the step mutates the KV cache and its
        own token buffers, inputs that make inductor skip its graphs. `capture()` graphs the
        compiled step instead. Shapes are static (dynamic=False): one compile per batch size.
        pdl: inductor's Triton kernels use programmatic dependent launch (`triton.enable_pdl`, Hopper):
        each waits for the kernel before it only before its first dependent load and lets the next
        one launch after its loads, so launches overlap the tails of the kernels before them."""
        options = None
        if pdl:
            from torch._inductor import config as inductor_config

            if not hasattr(inductor_config.triton, "enable_pdl"):
                raise ValueError(f"compile(pdl=True): torch {torch.__version__}'s inductor has no triton.enable_pdl; "
                                 "compile without it")
            options = {"triton.enable_pdl": True}
        self.compiled = torch.compile(self.step, dynamic=False, options=options)

    def run_steps(self, n: int) -> None:
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            elif self.compiled is not None:
                self.compiled()
            else:
                self.step()
