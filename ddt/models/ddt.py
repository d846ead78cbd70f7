"""The Decoupled Diffusion Transformer (DDT, arXiv 2504.05741).

A class-conditional velocity network whose blocks are split into a *condition encoder* (the first
`encoder_depth` blocks, which turn the noisy input into a per-token self-condition `s`) and a
*velocity decoder* (the remaining blocks, modulated per token by `s`). Parameter names follow the
official implementation (github.com/MCG-NJU/DDT, `DDT` in decoupled_improved_dit.py) so that
released checkpoints load by name; `DDT.from_official` does the prefix and argument mapping.

Time convention: t = 0 is pure noise, t = 1 is data.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; shift/scale broadcast per sample (B, 1, D) or per token (B, N, D)."""
    return x * (1 + scale) + shift


#################################################################################
#                       Embedders for patches, time and labels                  #
#################################################################################

class PatchEmbed(nn.Module):
    """Linear projection of unfolded (C, p, p) patches."""

    def __init__(self, patch_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (max period 10, cos first) followed by an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_size = frequency_size
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(
            -math.log(self.max_period)
            * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row: index `num_classes` is the null (CFG) label."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


#################################################################################
#                        Attention with qk-norm and 2-D RoPE                    #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the official LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_2d(head_dim: int, height: int, width: int, theta: float = 1e4) -> torch.Tensor:
    """Complex 2-D rotary frequencies (height*width, head_dim/2), x and y interleaved."""
    # Positions span [0, 16] on each axis whatever the grid size, as in the official model.
    y_pos, x_pos = torch.meshgrid(
        torch.linspace(0, 16, height), torch.linspace(0, 16, width), indexing="ij"
    )
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    x_angles = torch.outer(x_pos.reshape(-1), freqs)  # (N, head_dim/4)
    y_angles = torch.outer(y_pos.reshape(-1), freqs)
    cis = torch.stack([torch.polar(torch.ones_like(x_angles), x_angles),
                       torch.polar(torch.ones_like(y_angles), y_angles)], dim=-1)
    return cis.reshape(height * width, -1)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, H, head_dim) queries or keys by complex frequencies (N, head_dim/2)."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * cis[None, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention: no qkv bias, RMSNorm on q and k, RoPE, SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"hidden_size={dim} must split into num_heads={num_heads} heads whose "
                             f"width is a multiple of 4 (2-D RoPE)")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).unbind(2)
        q = apply_rope(self.q_norm(q), rope)  # (B, N, H, Dh)
        k = apply_rope(self.k_norm(k), rope)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward without biases, hidden width int(2/3 * mlp_ratio * dim)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


#################################################################################
#                               Blocks and final layer                          #
#################################################################################

class DDTBlock(nn.Module):
    """Pre-norm transformer block with adaLN shift/scale/gate from a condition (B, 1|N, D)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """LayerNorm without affine, adaLN shift/scale, linear projection to patch values."""

    def __init__(self, hidden_size: int, patch_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                    The DDT                                    #
#################################################################################

class DDT(nn.Module):
    """Condition encoder (blocks[:encoder_depth]) + velocity decoder (blocks[encoder_depth:])."""

    def __init__(self, *, in_channels: int, patch_size: int, hidden_size: int, num_heads: int,
                 depth: int, encoder_depth: int, num_classes: int):
        super().__init__()
        if not 0 < encoder_depth < depth:
            raise ValueError(f"encoder_depth={encoder_depth} must be between 1 and depth-1={depth - 1} "
                             f"(the decoder needs at least one block)")
        self.in_channels, self.patch_size = in_channels, patch_size
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.depth, self.encoder_depth = depth, encoder_depth
        self.num_classes = num_classes
        patch_dim = in_channels * patch_size**2
        self.s_embedder = PatchEmbed(patch_dim, hidden_size)  # encoder input
        self.x_embedder = PatchEmbed(patch_dim, hidden_size)  # decoder input
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(DDTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_dim)
        self._rope_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    @property
    def decoder_depth(self) -> int:
        return self.depth - self.encoder_depth

    def initialize_weights(self) -> None:
        """Official initialisation: xavier patch embedders, N(0, 0.02) embeddings, zeroed output."""
        for embedder in (self.s_embedder, self.x_embedder):
            nn.init.xavier_uniform_(embedder.proj.weight)
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def rope(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_2d(self.hidden_size // self.num_heads, height, width).to(device)
        return self._rope_cache[key]

    def _patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfolded (C, p, p) patches (B, N, C*p*p) and the RoPE table of their grid."""
        p = self.patch_size
        rope = self.rope(x.shape[2] // p, x.shape[3] // p, x.device)
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2), rope

    def _encode(self, patches: torch.Tensor, t_emb: torch.Tensor, y: torch.Tensor,
                rope: torch.Tensor) -> torch.Tensor:
        c = F.silu(t_emb + self.y_embedder(y)[:, None])  # (B, 1, D), one condition per sample
        h = self.s_embedder(patches)
        for block in self.blocks[: self.encoder_depth]:
            h = block(h, c, rope)
        return h

    def _decode(self, x: torch.Tensor, patches: torch.Tensor, s: torch.Tensor,
                rope: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(patches)
        for block in self.blocks[self.encoder_depth:]:
            h = block(h, s, rope)
        out = self.final_layer(h, s)  # (B, N, C*p*p)
        return F.fold(out.transpose(1, 2), x.shape[2:], kernel_size=self.patch_size, stride=self.patch_size)

    def encoder_output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The condition encoder's last hidden state h (B, N, D), before the timestep is added."""
        patches, rope = self._patches(x)
        return self._encode(patches, self.t_embedder(t.reshape(-1))[:, None], y, rope)

    def self_condition(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s = SiLU(t_emb + h): the per-token condition of the decoder at time t."""
        return F.silu(self.t_embedder(t.reshape(-1))[:, None] + h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity for x (B, C, H, W) at times t (B,) and labels y (B,); pass s to skip the encoder."""
        patches, rope = self._patches(x)
        if s is None:
            t_emb = self.t_embedder(t.reshape(-1))[:, None]  # (B, 1, D)
            s = F.silu(t_emb + self._encode(patches, t_emb, y, rope))  # (B, N, D), one per token
        return self._decode(x, patches, s, rope), s

    @classmethod
    def from_official(cls, config: Mapping, state_dict: Mapping[str, torch.Tensor],
                      prefer_ema: bool = True) -> "DDT":
        """Build from the official constructor arguments and (Lightning) state dict."""
        from ddt.checkpoint import official_denoiser_state_dict

        model = cls(in_channels=config["in_channels"], patch_size=config["patch_size"],
                    hidden_size=config["hidden_size"], num_heads=config["num_groups"],
                    depth=config["num_blocks"], encoder_depth=config["num_encoder_blocks"],
                    num_classes=config["num_classes"])
        model.load_state_dict(official_denoiser_state_dict(state_dict, prefer_ema=prefer_ema))
        return model


#################################################################################
#                                  Size presets                                 #
#################################################################################

# name: (depth, hidden_size, num_heads, default encoder_depth)
DDT_PRESETS = {
    "quickstart": (28, 64, 4, 22),
    "S": (12, 384, 6, 8),
    "B": (12, 768, 12, 8),
    "L": (24, 1024, 16, 20),
    "XL": (28, 1152, 16, 22),
}


def build_ddt(preset: str, *, in_channels: int = 4, patch_size: int = 2, num_classes: int = 1000,
              encoder_depth: int | None = None, **overrides) -> DDT:
    """DDT of a named size; defaults give the paper's latent ImageNet model."""
    if preset not in DDT_PRESETS:
        raise KeyError(f"unknown DDT preset {preset!r}; choose one of {sorted(DDT_PRESETS)}")
    depth, hidden_size, num_heads, default_encoder_depth = DDT_PRESETS[preset]
    kwargs = dict(in_channels=in_channels, patch_size=patch_size, hidden_size=hidden_size,
                  num_heads=num_heads, depth=depth, num_classes=num_classes,
                  encoder_depth=encoder_depth or default_encoder_depth)
    kwargs.update(overrides)
    return DDT(**kwargs)
