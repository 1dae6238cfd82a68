"""Family adapters: where each VLM keeps its decoder, head and vision parts, and its image tokens.

The trainer, the teacher engine, QAT and the losses never touch a model's attribute paths directly;
they ask the adapter. One subclass per family (transformers 5 layouts):

    family       decoder stack                    vision (frozen)                        head
    llava        model.model.language_model       model.model.vision_tower, .multi_modal_projector   model.lm_head
    qwen2_vl     model.model.language_model       model.model.visual (blocks + merger)   model.lm_head
    qwen2_5_vl   same as qwen2_vl
    qwen3_vl     same (visual also holds the deepstack mergers)

An adapter is bound to one config (`get_adapter(model_or_config)`): `visual_positions` needs the
image token ids and LLaVA's tokens per image.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from grace_ds.models.capture import OutputCapture

# Base-model inputs an adapter forwards; anything else in a batch (labels, sample ids) is dropped.
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                     "position_ids", "image_sizes")


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine / DDP wrapper (their `.module`)."""
    # A DeepSpeedEngine has a `.config` too (the DeepSpeed one), so look for an HF config.
    while hasattr(model, "module") and not hasattr(getattr(model, "config", None), "model_type"):
        model = model.module
    return model


class VLMAdapter:
    family: str = ""
    model_class_name: str = ""
    # Decoder linears to quantise; vision tower, projector/merger, embeddings and lm_head stay 16-bit.
    quant_include: tuple[str, ...] = (r"language_model\.(model\.)?layers\.\d+\.(self_attn|mlp)\.",)

    def __init__(self, config=None):
        self.config = config

    # -- module paths -------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return unwrap(model).model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return unwrap(model).lm_head

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    # -- tokens -------------------------------------------------------------------------------
    def image_token_id(self, config=None) -> int:
        raise NotImplementedError

    def tokens_per_image(self, config=None) -> int | None:
        """Fixed visual tokens per image, or None when it depends on the image size (Qwen)."""
        return None

    def visual_index(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Every visual token of the batch, image after image in row-major order: (rows (N,),
        positions (N,), tokens per image). Vectorised over the batch: two device->host syncs in all.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        rc = torch.nonzero(input_ids == self.image_token_id(), as_tuple=False)   # (N, 2), row-major
        rows, cols = rc[:, 0], rc[:, 1]
        if rows.numel() == 0:
            return rows, cols, []
        # Maximal runs of consecutive image tokens in one row. Qwen images are always separated by
        # <|vision_end|><|vision_start|>, so a run is one image; LLaVA images may abut, so runs
        # are cut into tokens_per_image pieces.
        new_run = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)
        cuts = (torch.nonzero(new_run, as_tuple=False).flatten() + 1).tolist()
        bounds = [0, *cuts, rows.numel()]
        runs = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        per_image = self.tokens_per_image()
        if per_image is None:
            return rows, cols, runs
        counts: list[int] = []
        for a, n in zip(bounds[:-1], runs):
            if n % per_image:
                raise ValueError(
                    f"row {int(rows[a])}: a run of {n} {self.family} image tokens at position "
                    f"{int(cols[a])} is not a multiple of the {per_image} tokens per image: the text "
                    "was truncated through an image or not expanded by the processor")
            counts.extend([per_image] * (n // per_image))
        return rows, cols, counts

    def visual_positions(self, input_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Per image, in order (row-major): (batch row, LongTensor of its visual-token positions)."""
        rows, cols, counts = self.visual_index(input_ids)
        if not counts:
            return []
        firsts = rows[torch.tensor([0, *counts[:-1]], device=rows.device).cumsum(0)].tolist()
        return list(zip(firsts, cols.split(counts)))

    # -- forward ------------------------------------------------------------------------------
    def model_inputs(self, model: nn.Module, batch: dict) -> dict:
        from grace_ds.models.fast_paths import inputs_for

        hf = unwrap(model)
        params = inspect.signature(hf.model.forward).parameters
        batch = inputs_for(hf.config, batch)   # position ids precomputed for another RoPE are dropped
        return {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch and batch[k] is not None and k in params}

    def forward_hidden(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final normed hidden (B,S,H), penultimate hidden (B,S,H) = HF `hidden_states[-2]`).

        Calls the base model (`model.model`), so no (B,S,V) logits are materialised - the fused loss
        recomputes them chunk by chunk - and no `output_hidden_states`, so only the penultimate
        layer's output is kept, by a hook. Accepts a DeepSpeed engine (uses `engine.module`).
        """
        hf = unwrap(model)
        with OutputCapture(self.decoder_layers(hf)[-2]) as cap:
            # Explicit False: a checkpoint whose config sets output_hidden_states would otherwise keep
            # every layer's (B,S,H) output alive, which is what the hook is here to avoid.
            out = hf.model(**self.model_inputs(hf, batch), use_cache=False, return_dict=True,
                           output_hidden_states=False, output_attentions=False)
        return out.last_hidden_state, cap.take()


class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_class_name = "LlavaForConditionalGeneration"

    def vision_modules(self, model):
        m = unwrap(model).model
        return [m.vision_tower, m.multi_modal_projector]

    def image_token_id(self, config=None) -> int:
        cfg = config if config is not None else self.config
        return int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index)

    def tokens_per_image(self, config=None) -> int | None:
        cfg = config if config is not None else self.config
        vc = cfg.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        # "default" drops CLIP's CLS token; "full" keeps it.
        return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"

    def vision_modules(self, model):
        return [unwrap(model).model.visual]

    def image_token_id(self, config=None) -> int:
        cfg = config if config is not None else self.config
        return int(cfg.image_token_id)


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"


ADAPTERS: dict[str, type[VLMAdapter]] = {
    a.family: a for a in (LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter)
}


def _config_of(model_or_config):
    obj = model_or_config
    if isinstance(obj, nn.Module):
        obj = unwrap(obj).config
    return obj


def get_adapter(model_or_config) -> VLMAdapter:
    """The adapter for a model, a DeepSpeed engine, or a config (uses `config.model_type`)."""
    cfg = _config_of(model_or_config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model_type {model_type!r}: grace_ds supports {', '.join(ADAPTERS)}; add a "
            "VLMAdapter subclass in grace_ds/models/adapters.py for a new family")
    return ADAPTERS[model_type](cfg)


def model_class_for(config) -> type:
    """The transformers `...ForConditionalGeneration` class of a config's family."""
    import transformers

    adapter = get_adapter(config)
    return getattr(transformers, adapter.model_class_name)
