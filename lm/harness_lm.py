"""Our model as an lm-evaluation-harness `LM`: the three request types lm-eval's tasks send.

Imported only once lm-eval is known to be installed (lm.harness checks), since the adapter
subclasses `lm_eval.api.model.LM`.

Text to ids. A request's strings are tokenised as lm-eval's own Hugging Face backend does, so both
score the same tokens: a (context, continuation) pair is encoded whole and the context's ids are cut
off the front (trailing spaces of the context belong to the continuation); an empty context, and a
rolling text, start after the end-of-document id, as every document does in training and in
`lm eval`.

Long inputs. A sequence is scored in windows of at most `context` tokens (lm.evaluate.window_plan):
the first scores up to `context` targets, each later one advances by `stride` and scores its last
`stride` targets, and every window reaches back as far as its context allows. A rolling text is
thus scored exactly as `lm eval --context C --stride S` scores it; a continuation that fits one
window gets the whole context window before it, which is what lm-eval's backend computes.

Batching. Windows of all requests are sorted by length (longest first) and run `batch_size` at a
time, right-padded: the model is causal, so padding after a row's end changes none of its logits.
Generation groups prompts of one length and gen_kwargs (lm.generate.generate_batch, no padding).
"""

import json

import torch
from lm_eval.api.model import LM

from core.errors import UserError
from lm.evaluate import window_plan
from lm.generate import generate_batch

# gen_kwargs lm-eval's tasks send that this backend follows; any other is refused, not ignored.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
MAX_GEN_TOKS = 256  # lm-eval's default when a task gives none


def scored_windows(length: int, first: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, keep) windows scoring targets sequence[first:] of a sequence of `length` ids:
    inputs sequence[start:end], targets sequence[start + 1 : end + 1], the last `keep` of them scored.

    window_plan's windows over the targets, each extended back into the ids before them as far as
    `context` allows (with first == 1, a leading eod and a text, they are exactly lm eval's)."""
    plan = window_plan(length - first, context, stride) if length > first else []
    return [(max(0, end + first - 1 - context), end + first - 1, keep) for _, end, keep in plan]


class CheckpointLM(LM):
    """A loaded GPT and its run's tokenizer behind lm-eval's `loglikelihood`,
    `loglikelihood_rolling` and `generate_until`, on the model's device."""

    def __init__(self, model, tokenizer, context=None, stride=None, batch_size=8, seed=0, checkpoint=None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.context = context if context is not None else model.config.block_size
        if self.context > model.config.block_size:
            raise UserError(f"--context {self.context} exceeds the model's context of {model.config.block_size}")
        self.stride = stride if stride is not None else max(1, self.context // 2)
        window_plan(1, self.context, self.stride)  # a bad context or stride fails here, in one line
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self._device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)  # sampled generation only
        self.checkpoint = checkpoint

    # What lm-eval reads about a model: results' config, request caches.
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.context

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__))

    def get_model_info(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "parameters": self.model.num_parameters(),
            "context": self.context,
            "stride": self.stride,
        }

    # ---- text to ids ---------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.tokenizer.eod_id], self.tokenizer.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:  # " word" tokenises as one piece with its space: keep them together
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids) :]

    # ---- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p of ids[first:] given what precedes them, whether each is the argmax) per
        (ids, first); log-probabilities from fp32 logits, summed in float64."""
        windows = [
            (r, start, end, keep)
            for r, (ids, first) in enumerate(sequences)
            for start, end, keep in scored_windows(len(ids), first, self.context, self.stride)
        ]
        windows.sort(key=lambda w: w[1] - w[2])  # longest first (stable: ties keep request order)
        totals = [0.0] * len(sequences)
        greedy = [True] * len(sequences)
        vocab = self.tokenizer.vocab_size  # a padded vocabulary's extra ids are no token
        for i in range(0, len(windows), self.batch_size):
            chunk = windows[i : i + self.batch_size]
            width = max(end - start for _, start, end, _ in chunk)
            inputs = torch.full((len(chunk), width), self.tokenizer.eod_id, dtype=torch.long)
            targets = torch.zeros_like(inputs)
            for row, (r, start, end, _) in enumerate(chunk):
                ids = torch.tensor(sequences[r][0][start : end + 1])
                inputs[row, : end - start], targets[row, : end - start] = ids[:-1], ids[1:]
            logits, _ = self.model(inputs.to(self.device))
            logits = logits.float()
            picked = logits.log_softmax(dim=-1).gather(-1, targets.to(self.device)[..., None])[..., 0].double().cpu()
            best = logits[..., :vocab].argmax(dim=-1).cpu()
            for row, (r, start, end, keep) in enumerate(chunk):
                scored = slice(end - start - keep, end - start)
                totals[r] += picked[row, scored].sum().item()
                greedy[r] = greedy[r] and bool((best[row, scored] == targets[row, scored]).all())
        return list(zip(totals, greedy))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args[:2]) for req in requests]
        return self.score([(context + continuation, len(context)) for context, continuation in pairs])

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [[self.tokenizer.eod_id] + self.tokenizer.encode(req.args[0]) for req in requests]
        return [total for total, _ in self.score([(ids, 1) for ids in texts])]

    # ---- generation ----------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple[str, int], list[int]] = {}
        prompts = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                raise UserError(f"lm harness does not support the gen_kwargs {unknown}; it follows {list(GEN_KWARGS)}")
            # A context longer than the model's keeps its end; generation then slides (generate_batch).
            ids = self.tokenizer.encode(context) if context else [self.tokenizer.eod_id]
            ids = ids[-self.model.config.block_size :]
            prompts.append(ids)
            groups.setdefault((json.dumps(kwargs, sort_keys=True, default=str), len(ids)), []).append(i)
        for (kwargs_json, _), members in sorted(groups.items(), key=lambda g: -g[0][1]):
            kwargs = json.loads(kwargs_json)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampled = kwargs.get("do_sample", False) and kwargs.get("temperature", 1.0) > 0
            for b in range(0, len(members), self.batch_size):
                batch = members[b : b + self.batch_size]
                texts = self.continuations(
                    [prompts[i] for i in batch],
                    until,
                    int(kwargs.get("max_gen_toks", MAX_GEN_TOKS)),
                    float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                    kwargs.get("top_k") if sampled else None,
                    kwargs.get("top_p") if sampled else None,
                )
                for i, text in zip(batch, texts):
                    outputs[i] = text
        return outputs

    def continuations(self, prompts, until, max_new, temperature, top_k, top_p) -> list[str]:
        """Each prompt's continuation, cut before the first stop string or the end of document."""
        tokenizer = self.tokenizer

        def text_of(i: int, new: list[int]) -> str:
            if tokenizer.eod_id in new:
                new = new[: new.index(tokenizer.eod_id)]
            prompt = tokenizer.decode(prompts[i])
            text = tokenizer.decode(prompts[i] + new)[len(prompt) :]  # keeps a leading space
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            return text[: min(cuts)] if cuts else text

        def finished(i: int, new: list[int]) -> bool:
            return tokenizer.eod_id in new or any(stop and stop in text_of(i, new) for stop in until)

        new = generate_batch(
            self.model,
            prompts,
            max_new,
            temperature,
            top_k,
            top_p,
            self.generator,
            vocab_size=tokenizer.vocab_size,
            finished=finished,
        )
        return [text_of(i, ids) for i, ids in enumerate(new)]
