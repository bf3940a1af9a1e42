"""Autoregressive decoding with a KV cache: greedy, or sampled with temperature / top-k / top-p."""

from collections.abc import Sequence

import torch

from mytune.models.transformer import TransformerDecoder
from mytune.modules.kv_cache import KVCache


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `[batch]` from last-position logits `[batch, vocab]`; temperature 0 means argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the most likely one always stays)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


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
    args = model.args
    cache = KVCache(batch_size=tokens.shape[0], max_seq_len=tokens.shape[1] + max_new_tokens,
                    num_layers=args.num_hidden_layers, num_kv_heads=args.kv_heads, head_dim=args.attn_head_dim,
                    dtype=model.lm_head.weight.dtype, device=tokens.device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=tokens.device)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    out = [tokens]
    logits = model(tokens, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        next_ids = torch.where(finished, out[-1][:, -1], next_ids)
        out.append(next_ids[:, None])
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = model(next_ids[:, None], kv_cache=cache)[:, -1]
    return torch.cat(out, dim=1)
