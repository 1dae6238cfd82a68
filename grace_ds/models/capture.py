"""Capture one module's forward output with a hook, without `output_hidden_states`.

`output_hidden_states=True` keeps every layer's (B,S,H) output alive until the loss is computed: 80
of them for a 72B teacher. RCKA needs only the penultimate layer, so a forward hook on that one
decoder layer keeps just its output tensor.

Works under DeepSpeed ZeRO-3: the hook is an ordinary forward hook on the submodule and fires
after ZeRO's own pre-forward gather, whether the model is called directly or through
`engine.module`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OutputCapture:
    """Context manager: `with OutputCapture(layer) as cap: model(...)`, then `cap.output`.

    Only the first call inside the block is kept: with activation checkpointing the layer runs
    again during backward, and that recomputed output must not replace the one in the graph.
    """

    module: nn.Module
    output: torch.Tensor | None = None
    _handle: object = field(default=None, repr=False)

    def _hook(self, module, args, out):
        if self.output is None:
            # Decoder layers return a tensor in transformers 5 and a tuple (hidden, ...) in 4.x.
            self.output = out[0] if isinstance(out, (tuple, list)) else out

    def __enter__(self) -> OutputCapture:
        self.output = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> torch.Tensor:
        """The captured tensor; raises if the module never ran (wrong layer, or model not called)."""
        if self.output is None:
            raise RuntimeError(
                f"{type(self.module).__name__} did not run inside the capture block: hook the "
                "decoder layer that the forward actually calls (adapter.decoder_layers(model)[-2])")
        out, self.output = self.output, None
        return out


def capture_penultimate(model: nn.Module, adapter=None) -> OutputCapture:
    """An `OutputCapture` on the penultimate decoder layer (= `hidden_states[-2]` of the HF model)."""
    if adapter is None:
        from grace_ds.models.adapters import get_adapter

        adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    if len(layers) < 2:
        raise ValueError(f"penultimate hidden needs >= 2 decoder layers, the model has {len(layers)}")
    return OutputCapture(layers[-2])
