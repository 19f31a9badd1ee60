"""Rotary position embedding (Su et al., "RoFormer", 2021), in the feature order of Hugging Face's Llama.

Each head's features are rotated in pairs (i, i + head_dim / 2) by the angle position * theta^(-2i /
head_dim): x' = x cos + rotate_half(x) sin. Queries and keys are rotated once, after their
projection, so q_m . k_n depends on m - n alone. Twicing's two passes share that one A, so both use
the same rotated q and k; values are not rotated. A cache keeps rotated keys: a token's rotation
depends on its own position only.
"""

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (T, head_dim) in fp32, halves repeated as rotate_half wants."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inverse_frequencies = 1.0 / (theta**exponents)
    angles = positions.float()[:, None] * inverse_frequencies[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, T, head_dim) rotated by the (T, head_dim) angles, in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
