"""Model-facing scoring: greedy generation and option log-likelihood, batched.

Prompts are rendered with the checkpoint's own chat template (add_generation_prompt=True), exactly
as the training loader renders the user turns. A continuation (an option letter or an option's
text) is what the template would write for an assistant turn with that content, up to the end of
the content (the end-of-turn token is not scored): "B" after "<|im_start|>assistant\\n" for Qwen,
" B" after "ASSISTANT:" for LLaVA. Batches are LEFT padded, so every row's continuation is its last
k tokens and the logits that predict them are the k positions before.

Letter log-likelihood normally costs nothing extra: a one-token letter continuation is scored from
the first generation step's raw logits. Multi-token continuations (and option texts) get their own
batched forward passes. Log-probabilities are taken over the tokenizer's real vocabulary (padded
rows of the lm_head are excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grace_ds.eval.samples import EvalItem
from grace_ds.eval.scoring import exact_match, parse_answer_letter, pick_max


@dataclass
class Continuation:
    ids: list[int]            # continuation token ids (the last len(ids) tokens of prompt+cont)
    text: str                 # continuation text appended to the prompt
    prefix_exact: bool        # the prompt's own tokens are an exact prefix of prompt+cont


class Predictor:
    def __init__(self, model, processor, *, max_new_tokens: int = 16, score_text: bool = True,
                 forward_batch: int = 16):
        self.model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.score_text = score_text
        self.forward_batch = forward_batch
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.real_vocab = len(self.tok)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set one (batched evaluation pads prompts)")

    # ---- rendering -------------------------------------------------------------------------
    def prompt_text(self, item: EvalItem) -> str:
        return self.processor.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)

    def continuation(self, item: EvalItem, prompt: str, answer: str) -> Continuation:
        msgs = item.messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        if full.startswith(prompt) and answer and answer in full[len(prompt):]:
            rest = full[len(prompt):]
            cont = rest[: rest.index(answer) + len(answer)]
        else:   # a template that re-renders earlier turns differently: score the bare answer
            cont = answer
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = self.tok(prompt + cont, add_special_tokens=False)["input_ids"]
        lcp = 0
        while lcp < min(len(p_ids), len(f_ids)) and p_ids[lcp] == f_ids[lcp]:
            lcp += 1
        if lcp == len(f_ids):   # empty continuation cannot be scored
            raise ValueError(f"sample {item.key!r}: continuation {answer!r} adds no tokens to the prompt")
        return Continuation(f_ids[lcp:], cont, lcp == len(p_ids))

    def _encode(self, texts: list[str], images: list[list]) -> dict:
        flat = [im for ims in images for im in ims]
        kwargs = dict(text=texts, return_tensors="pt", padding=True)
        if flat:
            kwargs["images"] = flat
        batch = self.processor(**kwargs)
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
                out[k] = v
        return out

    # ---- model calls -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], images: list[list]) -> tuple[list[str], torch.Tensor]:
        """Greedy answers and the first step's log-probabilities (B, real_vocab)."""
        batch = self._encode(prompts, images)
        out = self.model.generate(
            **batch, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
            return_dict_in_generate=True, output_logits=True,
            pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
        )
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        first = out.logits[0].float()[:, : self.real_vocab].log_softmax(-1)
        return texts, first

    @torch.no_grad()
    def continuation_logprobs(self, rows: list[tuple[str, list, Continuation]]) -> list[list[float]]:
        """Per row (prompt, images, continuation): log p of each continuation token."""
        results: list[list[float]] = []
        for s in range(0, len(rows), self.forward_batch):
            chunk = rows[s: s + self.forward_batch]
            batch = self._encode([p + c.text for p, _, c in chunk], [ims for _, ims, _ in chunk])
            logits = self.model(**batch).logits
            ids = batch["input_ids"]
            for r, (_, _, c) in enumerate(chunk):
                k = len(c.ids)
                tail = ids[r, -k:].tolist()
                if tail != c.ids:
                    raise RuntimeError(f"continuation tokens {c.ids} are not the row's last tokens {tail}: "
                                       "the processor changed the text tokenisation")
                lp = logits[r, -k - 1:-1].float()[:, : self.real_vocab].log_softmax(-1)
                results.append(lp.gather(1, ids[r, -k:, None]).squeeze(1).tolist())
        return results

    # ---- one batch of items ----------------------------------------------------------------
    def score(self, items: list[EvalItem]) -> list[dict]:
        prompts = [self.prompt_text(it) for it in items]
        gen_texts, first_lp = self.generate(prompts, [it.images for it in items])
        records = []
        pending: list[tuple[int, str, str, Continuation]] = []   # (item idx, score name, letter, cont)
        letter_scores: list[dict] = [{} for _ in items]
        text_scores: list[dict] = [{} for _ in items]
        for i, (it, prompt) in enumerate(zip(items, prompts)):
            if it.kind != "mc":
                continue
            for opt in it.options:
                c = self.continuation(it, prompt, opt.letter)
                if len(c.ids) == 1 and c.prefix_exact:
                    letter_scores[i][opt.letter] = float(first_lp[i, c.ids[0]])
                else:
                    pending.append((i, "letter", opt.letter, c))
                if self.score_text:
                    pending.append((i, "text", opt.letter, self.continuation(it, prompt, opt.text)))
        if pending:
            lps = self.continuation_logprobs([(prompts[i], items[i].images, c) for i, _, _, c in pending])
            for (i, name, letter, _), lp in zip(pending, lps):
                if name == "letter":
                    letter_scores[i][letter] = sum(lp)
                else:   # length-normalised: option texts differ in token count
                    text_scores[i][letter] = sum(lp) / len(lp)
        for i, it in enumerate(items):
            rec = {"key": it.key, "kind": it.kind, "type": it.qtype, "reference": it.reference,
                   "prediction": gen_texts[i]}
            if it.kind == "mc":
                pred = parse_answer_letter(gen_texts[i], it.options)
                ll = pick_max(letter_scores[i])
                hits = {"mc_gen": pred == it.answer_letter, "mc_ll": ll == it.answer_letter}
                rec.update(answer=it.answer_letter, pred_letter=pred, ll_letter=ll, unparsed=pred is None,
                           letter_logprobs=letter_scores[i])
                if self.score_text:
                    tl = pick_max(text_scores[i])
                    hits["mc_ll_text"] = tl == it.answer_letter
                    rec.update(ll_text=tl)
            else:
                hits = {"em": exact_match(gen_texts[i], it.reference)}
            rec["hits"] = hits
            records.append(rec)
        return records
