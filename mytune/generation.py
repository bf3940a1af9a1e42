"""Autoregressive decoding with a KV cache: greedy, or sampled with temperature / top-k / top-p.

`sample_next` picks one token per row from last-position logits; `filter_logits` is the distribution it samples
from (temperature, then top-k, then top-p, as transformers' warpers apply them). `stream_generate` yields the new
ids one step at a time (so a caller can time the first token); `generate` collects them after the prompt.
"""

from collections.abc import Iterator, Sequence

import torch

from mytune.models.transformer import TransformerDecoder
from mytune.modules.kv_cache import KVCache


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """float32 `logits / temperature` `[batch, vocab]` with the tokens outside top-k and the top-p nucleus set to -inf.

    top-k keeps the k largest logits (ties at the k-th value are all kept); top-p then keeps, of what is left, the
    smallest set of most likely tokens whose probability reaches `top_p` (the most likely token always stays).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `[batch]` from last-position logits `[batch, vocab]`; temperature 0 means argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_generate(model: TransformerDecoder, prompt_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, *,
                    stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next ids `[batch]` of every row, one decoding step at a time (at most `max_new_tokens` steps).

    The prompt `[batch, seq]` (a list -> batch 1; rows of equal length) is run once to fill a KV cache, then one
    token per step. A row that produced one of `stop_ids` keeps repeating it; the stream ends once every row stopped.
    """
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.lm_head.weight.device)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if max_new_tokens < 1:
        return
    args = model.args
    cache = KVCache(batch_size=tokens.shape[0], max_seq_len=tokens.shape[1] + max_new_tokens,
                    num_layers=args.num_hidden_layers, num_kv_heads=args.kv_heads, head_dim=args.attn_head_dim,
                    dtype=model.lm_head.weight.dtype, device=tokens.device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=tokens.device)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    previous = tokens[:, -1]
    logits = model(tokens, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        next_ids = torch.where(finished, previous, next_ids)
        yield next_ids
        finished |= torch.isin(next_ids, stop)
        if step == max_new_tokens - 1 or finished.all():
            return
        previous = next_ids
        logits = model(next_ids[:, None], kv_cache=cache)[:, -1]


@torch.no_grad()
def generate(model: TransformerDecoder, prompt_ids: torch.Tensor | Sequence[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, *,
             stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt followed by up to `max_new_tokens` generated ids, `[batch, prompt + new]` (a list prompt -> batch 1).

    The prompt is run once to fill a KV cache, then one token per step. Rows that produced one of `stop_ids` keep
    repeating it; decoding ends early once every row has stopped. Prompts in a batch must have equal lengths.
    """
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.lm_head.weight.device)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    steps = stream_generate(model, tokens, max_new_tokens, temperature, top_k, top_p, stop_ids=stop_ids,
                            generator=generator)
    return torch.cat([tokens, *(ids[:, None] for ids in steps)], dim=1)
