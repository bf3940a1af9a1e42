"""RMSNorm exactly as Hugging Face computes it (normalise in float32, scale in the input dtype)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: `weight * x / sqrt(mean(x^2) + eps)`.

    The normalisation runs in float32 and is cast back before the learned scale is applied, the same order of
    operations as `LlamaRMSNorm`, so bf16 outputs match Hugging Face bit for bit.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
