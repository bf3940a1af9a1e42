"""Packing: greedy packs, restarting positions, document ids, and the loss of a packed row == the sum of its samples'
losses run alone (a tiny float64 attention model with learned absolute positions, SDPA with our mask)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mytune.data import document_attention_mask, greedy_pack, padded_collate, sft_dataset_from_rows
from mytune.training.loss import count_label_tokens, cross_entropy_sum

# Short chat rows and a short Jinja template ("u:...;a:...;"), so that several samples fit in a 96-token pack.
ROWS = [{"messages": [{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "z" * (1 + n % 4)},
                      {"role": "user", "content": "y" * (n % 3)}, {"role": "assistant", "content": "w" * (n % 5)}]}
        for n in range(1, 16)]
TEMPLATE = "{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + ';' }}{% endfor %}"


def _dataset(tokenizer, **kwargs):
    return sft_dataset_from_rows(ROWS, tokenizer, chat_template=TEMPLATE, **kwargs)


def _loss_sum_float64(logits, labels):
    """Next-token cross-entropy summed in float64 (mytune's loss computes in float32 by design)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum").item()


def test_greedy_pack_keeps_order_and_never_overflows():
    bounds = greedy_pack([3, 4, 2, 5, 1, 1, 6], 7)
    assert bounds.tolist() == [0, 2, 4, 6, 7]  # [3, 4] [2, 5] [1, 1] [6]: 1 + 1 + 6 > 7
    lengths = [3, 4, 2, 5, 1, 1, 6]
    packs = [lengths[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    assert all(sum(p) <= 7 for p in packs) and sum(map(len, packs)) == len(lengths)


def test_greedy_pack_edge_cases():
    assert greedy_pack([], 8).tolist() == [0]
    assert greedy_pack([8, 8], 8).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        greedy_pack([1, 9], 8)


def test_packed_items_restart_positions_and_mask_first_labels(char_tokenizer):
    plain = _dataset(char_tokenizer, max_seq_len=64, train_on_input=True)
    packed = _dataset(char_tokenizer, max_seq_len=64, train_on_input=True, packed=True)
    assert packed.num_samples == len(ROWS) and len(packed) < len(ROWS)
    assert sum(packed.token_counts()) == sum(plain.token_counts())
    sample = 0
    for p in range(len(packed)):
        item = packed[p]
        assert len(item["tokens"]) <= 64 and len(set(map(len, item.values()))) == 1
        for document in range(max(item["document_ids"]) + 1):
            where = [i for i, d in enumerate(item["document_ids"]) if d == document]
            alone = plain[sample]
            assert where == list(range(where[0], where[0] + len(alone["tokens"])))
            assert [item["tokens"][i] for i in where] == alone["tokens"]
            assert [item["position_ids"][i] for i in where] == list(range(len(where)))
            assert [item["labels"][i] for i in where] == [-100] + alone["labels"][1:]
            sample += 1
    assert sample == len(ROWS)


def test_collate_pads_packed_rows_as_their_own_document():
    batch = [{"tokens": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0], "document_ids": [0, 0, 1]},
             {"tokens": [8], "labels": [-100], "position_ids": [0], "document_ids": [0]}]
    out = padded_collate(batch, pad_id=0, pad_to=4, attn_mask=True)
    assert out["tokens"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert out["document_ids"].tolist() == [[0, 0, 1, -1], [0, -1, -1, -1]]
    mask = out["attn_mask"]
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert mask.diagonal(dim1=-2, dim2=-1).all(), "every position attends to itself: no empty softmax rows"
    unpacked = padded_collate([{"tokens": [1, 2], "labels": [1, 2]}], pad_id=0)
    assert set(unpacked) == {"tokens", "labels", "seq_lens", "label_positions"} and unpacked["seq_lens"].tolist() == [2]
    assert unpacked["label_positions"].tolist() == [0]


class TinyAttentionLM(nn.Module):
    """Token + learned absolute position embeddings, one self-attention layer through SDPA, an lm head."""

    def __init__(self, vocab: int, dim: int = 16, max_positions: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_positions, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, position_ids=None, document_ids=None):
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
        h = self.embed(tokens) + self.positions(position_ids)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head: [b, 1, s, d]
        if document_ids is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=document_attention_mask(document_ids))
        h = h + self.out(attended.squeeze(1))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("train_on_input", [False, True])
def test_packed_loss_equals_the_sum_of_per_sample_losses(char_tokenizer, train_on_input):
    torch.manual_seed(0)
    model = TinyAttentionLM(vocab=200).double()
    plain = _dataset(char_tokenizer, max_seq_len=96, train_on_input=train_on_input)
    packed = _dataset(char_tokenizer, max_seq_len=96, train_on_input=train_on_input, packed=True)
    assert plain.stats["truncated"] == 0 and len(packed) < len(plain) / 2
    collate = partial(padded_collate, pad_id=0)

    alone_loss, alone_count = 0.0, 0
    for i in range(len(plain)):
        batch = collate([plain[i]])
        alone_loss += _loss_sum_float64(model(batch["tokens"]), batch["labels"])
        alone_count += count_label_tokens(batch["labels"])

    batch = collate([packed[i] for i in range(len(packed))])  # packs of different lengths: padding too
    assert batch["tokens"].shape[0] == len(packed) > 1
    logits = model(batch["tokens"], batch["position_ids"], batch["document_ids"])
    assert count_label_tokens(batch["labels"]) == alone_count
    assert _loss_sum_float64(logits, batch["labels"]) == pytest.approx(alone_loss, rel=1e-12)
    assert cross_entropy_sum(logits, batch["labels"]).item() == pytest.approx(alone_loss, rel=1e-5)

    # and the mask matters: plain causal attention over the same packed rows gives another loss
    leaky = _loss_sum_float64(model(batch["tokens"], batch["position_ids"]), batch["labels"])
    assert abs(leaky - alone_loss) > 1e-3
