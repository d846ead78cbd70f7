"""The Decoupled Diffusion Transformer (DDT, arXiv 2504.05741).

A class-conditional velocity network whose blocks are split into a *condition encoder* (the first
`encoder_depth` blocks, which turn the noisy input into a per-token self-condition `s`) and a
*velocity decoder* (the remaining blocks, modulated per token by `s`). Parameter names follow the
official implementation (github.com/MCG-NJU/DDT, `DDT` in decoupled_improved_dit.py) so that
released checkpoints load by name; `DDT.from_official` does the prefix and argument mapping.

The block options `norm`, `ffn`, `pos` and `qk_norm` default to DDT's (RMSNorm, SwiGLU, 2-D RoPE,
qk-norm); the other values build the paper's "naive" DiT-style variants (LayerNorm, GELU MLP,
fixed 2-D sin-cos positions). `SiT` is the paper's Improved-SiT baseline: the same blocks in one
undivided stack, every block conditioned on SiLU(t_emb + y_emb), no self-condition.

`decoder_hidden_size` / `decoder_num_heads` (default: the encoder's, which is the DDT above,
parameter for parameter) make the decoder a wide head as in RAE's DiT-DH (Zheng et al., arXiv
2510.11690, `DiTwDDTHead` in github.com/bytetriper/RAE stage2/models/DDT.py). Followed from RAE: the
decoder blocks, the decoder's patch embedder `x_embedder` and the final layer run at the head width
W with their own head count (and RoPE of the head's head_dim); the encoder's s = SiLU(t_emb + h)
enters the head through one Linear `s_projector` (D -> W, PyTorch's default init; a parameterless
identity when W = D), applied to a fresh and a reused s alike, and the projected s modulates every
head block and the final layer; the timestep and label embedders stay at the encoder's width.
Departed from RAE: `forward` returns s at the encoder's width, before the projection (RAE returns
only the velocity), so that encoder sharing reuses it unchanged; the blocks keep DDT's options
(qk-norm, no qkv bias) rather than RAE's LightningDiT ones.

Time convention: t = 0 is pure noise, t = 1 is data. `prediction` says what the last layer's output is
read as (velocity, clean image or noise, see PREDICTIONS); `forward` always returns the velocity.
"""
from __future__ import annotations

import inspect
import math
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ddt.schema import decoder_depth, has_encoder, head_problems, split_problem


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift; shift and scale per sample (B, 1, D) or per token (B, N, D)."""
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


NORMS, FFNS, POSITIONS = ("rmsnorm", "layernorm"), ("swiglu", "mlp"), ("rope", "sincos")


def make_norm(kind: str, dim: int) -> nn.Module:
    """Block pre-norm: RMSNorm (DDT) or LayerNorm without affine (DiT; adaLN supplies scale/shift)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    raise ValueError(f"model.norm={kind!r} is unknown; use one of {NORMS}")


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos absolute position embedding (height*width, dim), as DiT/SiT (MAE)."""
    def one_axis(positions: torch.Tensor, half: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
        angles = torch.outer(positions.reshape(-1).double(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    grid_w, grid_h = torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy")
    return torch.cat([one_axis(grid_w, dim // 2), one_axis(grid_h, dim // 2)], dim=1).float()


def rope_2d(head_dim: int, height: int, width: int, theta: float = 1e4) -> torch.Tensor:
    """2-D rotary angles (height*width, head_dim/2): pair j of a head rotates by angle[:, j], x and y interleaved."""
    # Positions span [0, 16] on each axis whatever the grid size, as in the official model.
    y_pos, x_pos = torch.meshgrid(
        torch.linspace(0, 16, height), torch.linspace(0, 16, width), indexing="ij"
    )
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    x_angles = torch.outer(x_pos.reshape(-1), freqs)  # (N, head_dim/4)
    y_angles = torch.outer(y_pos.reshape(-1), freqs)
    return torch.stack([x_angles, y_angles], dim=-1).reshape(height * width, -1)


class Rope(NamedTuple):
    """2-D RoPE tables of one grid: complex `cis` (N, 1, head_dim/2), real `cos`/`sin` (N, 1, head_dim)."""

    cis: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def rope_tables(angles: torch.Tensor, dtype: torch.dtype) -> Rope:
    """The rotation by `angles` (N, head_dim/2) as a complex table and as real cos/sin tables.

    Real form on the interleaved layout: out = x·cos + swap(x)·sin, where swap exchanges the two
    entries of each pair, cos repeats cos(angle) twice and sin holds (−sin, +sin): the official
    complex product (a + ib)(cos + i sin) element for element.
    """
    cos, sin = angles.cos(), angles.sin()  # float32, as torch.polar in the official table
    cis = torch.complex(cos.to(dtype), sin.to(dtype))
    real_cos = cos.repeat_interleave(2, dim=-1)
    real_sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
    return Rope(cis[:, None], real_cos.to(dtype)[:, None], real_sin.to(dtype)[:, None])


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate (B, N, H, head_dim) queries or keys, in float32 (as the official model)."""
    x32 = x.float()
    if torch.compiler.is_compiling():  # inductor fuses the real form into one kernel; it has no complex codegen
        swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) for each pair (a, b)
        return (x32 * rope.cos + swapped * rope.sin).type_as(x)
    # Eager: one complex multiply launches fewer kernels than the real form (measured faster on CPU).
    rotated = torch.view_as_complex(x32.unflatten(-1, (-1, 2))) * rope.cis
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class _CpuBf16Attention(torch.autograd.Function):
    """CPU flash attention on bf16 q, k, v whose backward runs in float32.

    torch's CPU flash-attention backward is 9x slower in bf16 than in float32 at head_dim 16 (19.5 vs
    2.1 ms for 64x4x64x16 on an AMX Xeon) and no faster at head_dim 64, while its bf16 forward is as fast
    or faster: so the forward stays bf16 (the official numbers) and the backward upcasts its inputs,
    which the bf16 kernel accumulates in float32 anyway; the gradients return in bf16.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, logsumexp = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, False)
        return tuple(g.to(torch.bfloat16) for g in grads)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, N, Dh) q, k, v; under CPU bf16 autocast with gradients, the
    backward runs in float32 (_CpuBf16Attention), otherwise F.scaled_dot_product_attention."""
    if (q.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return _CpuBf16Attention.apply(q.bfloat16(), k.bfloat16(), v.bfloat16())
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention: no qkv bias, RMSNorm on q and k (qk_norm), RoPE (when given), SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"hidden_size={dim} must split into num_heads={num_heads} heads whose "
                             f"width is a multiple of 4 (2-D RoPE)")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # (B, N, H, Dh) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # Strided (B, H, N, Dh) views: SDPA's CPU and CUDA kernels take them without copies.
        x = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
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


class Mlp(nn.Module):
    """DiT's feed-forward: Linear -> GELU (tanh) -> Linear, hidden width mlp_ratio * dim, with biases."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


#################################################################################
#                               Blocks and final layer                          #
#################################################################################

class DDTBlock(nn.Module):
    """Pre-norm transformer block with adaLN shift/scale/gate from a condition (B, 1|N, D)."""

    def __init__(self, hidden_size: int, num_heads: int, norm: str = "rmsnorm", ffn: str = "swiglu",
                 qk_norm: bool = True):
        super().__init__()
        if ffn not in FFNS:
            raise ValueError(f"model.ffn={ffn!r} is unknown; use one of {FFNS}")
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = SwiGLU(hidden_size) if ffn == "swiglu" else Mlp(hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope | None) -> torch.Tensor:
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
#                          Shared trunk, DDT and SiT                            #
#################################################################################

#################################################################################
#          What the output is read as: every reading becomes a velocity         #
#################################################################################

# JiT (Li & He 2025, arXiv 2511.13720; Denoiser in its denoiser.py, t_eps = 5e-2) clips the divisor of the
# x-prediction's velocity at 0.05; the same floor keeps eps-prediction finite near t = 0 (pure noise).
PREDICTION_MIN_DIVISOR = 0.05


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))  # (B,) -> (B, 1, 1, 1)


class VelocityPrediction:
    """`prediction=v`: the output is the velocity x − ε itself (the official DDT)."""

    @staticmethod
    def velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out


class DataPrediction:
    """`prediction=x` (JiT): the output is the clean image x̂, and v̂ = (x̂ − x_t) / (1 − t) on x_t = t·x + (1 − t)·ε."""

    @staticmethod
    def velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (out - x_t) / (1 - _per_sample(t, out)).clamp_min(PREDICTION_MIN_DIVISOR)


class NoisePrediction:
    """`prediction=eps`: the output is the noise ε̂, and v̂ = (x_t − ε̂) / t on x_t = t·x + (1 − t)·ε."""

    @staticmethod
    def velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t - out) / _per_sample(t, out).clamp_min(PREDICTION_MIN_DIVISOR)


PREDICTIONS = {"v": VelocityPrediction, "x": DataPrediction, "eps": NoisePrediction}


class _Transformer(nn.Module):
    """Embedders, blocks, final layer, positions and (un)patchify shared by DDT and SiT.

    blocks[encoder_depth:], x_embedder and final_layer run at decoder_hidden_size with
    decoder_num_heads; None (stored when equal to the encoder's) means hidden_size and num_heads.
    """

    arch: str  # the subclass's model.arch

    @property
    def decoupled(self) -> bool:
        """Whether the model has a condition encoder whose output s can be reused (ddt.schema.has_encoder)."""
        return has_encoder(self.arch)

    def __init__(self, *, in_channels: int, patch_size: int, hidden_size: int, num_heads: int, depth: int,
                 num_classes: int, norm: str = "rmsnorm", ffn: str = "swiglu", pos: str = "rope",
                 qk_norm: bool = True, encoder_depth: int = 0, decoder_hidden_size: int | None = None,
                 decoder_num_heads: int | None = None, prediction: str = "v"):
        super().__init__()
        if pos not in POSITIONS:
            raise ValueError(f"model.pos={pos!r} is unknown; use one of {POSITIONS}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is unknown; use one of {sorted(PREDICTIONS)}")
        self.prediction = prediction  # the loss and every sampler see velocities (forward converts)
        if headless := head_problems(self.arch, decoder_hidden_size, decoder_num_heads):
            raise ValueError("; ".join(headless))
        self.in_channels, self.patch_size = in_channels, patch_size
        self.hidden_size, self.num_heads, self.depth = hidden_size, num_heads, depth
        self.decoder_hidden_size = decoder_hidden_size if decoder_hidden_size != hidden_size else None
        self.decoder_num_heads = decoder_num_heads if decoder_num_heads != num_heads else None
        self.num_classes = num_classes
        self.norm, self.ffn, self.pos, self.qk_norm = norm, ffn, pos, qk_norm
        self.patch_dim = in_channels * patch_size**2
        width, heads = self.decoder_size
        if self.decoupled:  # created first, so that a seed gives the same initial weights as before
            self.s_embedder = PatchEmbed(self.patch_dim, hidden_size)  # the encoder's input
        self.x_embedder = PatchEmbed(self.patch_dim, width)  # the decoder's (SiT: the only) input
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(
            DDTBlock(hidden_size, num_heads, norm, ffn, qk_norm) if i < encoder_depth
            else DDTBlock(width, heads, norm, ffn, qk_norm) for i in range(depth))
        self.final_layer = FinalLayer(width, self.patch_dim)
        self._position_cache: dict[tuple, Rope | torch.Tensor] = {}
        self.activation_checkpointing = False  # set by the trainer (train.activation_checkpointing)

    def _block(self, block: DDTBlock, h: torch.Tensor, c: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        """One block; under activation checkpointing its activations are recomputed in backward."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, c, rope, use_reentrant=False)
        return block(h, c, rope)

    def initialize_weights(self) -> None:
        """Official initialisation: xavier patch embedders, N(0, 0.02) embeddings, zeroed output."""
        for embedder in self.patch_embedders():
            nn.init.xavier_uniform_(embedder.proj.weight)
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def config(self) -> dict:
        """What rebuilds this network (`build_model(**config)`); checkpoints save it as their signature."""
        return {"arch": self.arch, **{name: getattr(self, name, None) for name in _constructor_defaults()}}

    def config_mismatch(self, saved: Mapping) -> list[str]:
        """`model.KEY: checkpoint A, config B` for every key on which a saved config differs from this one.

        A key the checkpoint lacks was added later: it takes the default that reproduces what such a
        checkpoint was trained as (the constructor's; before `arch` existed every network was a DDT).
        """
        saved = {"arch": "ddt", **_constructor_defaults(), **saved}
        return [f"model.{k}: checkpoint {saved.get(k)}, config {v}" for k, v in self.config.items() if saved.get(k) != v]

    def patch_embedders(self) -> list[PatchEmbed]:
        return [self.s_embedder, self.x_embedder] if self.decoupled else [self.x_embedder]

    @property
    def decoder_size(self) -> tuple[int, int]:
        """Width and heads of the decoder blocks (SiT: of every block)."""
        return self.decoder_hidden_size or self.hidden_size, self.decoder_num_heads or self.num_heads

    def positions(self, height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32,
                  size: tuple[int, int] | None = None) -> Rope | torch.Tensor:
        """RoPE tables (complex and cos/sin) or the sin-cos embedding (N, D) for blocks of `size` (width,
        heads; default the encoder's), cached per grid, size, device and dtype."""
        hidden_size, num_heads = size or (self.hidden_size, self.num_heads)
        key = (height, width, hidden_size, num_heads, device, dtype)
        if key not in self._position_cache:
            if self.pos == "rope":
                angles = rope_2d(hidden_size // num_heads, height, width)
                table = Rope(*(t.to(device) for t in rope_tables(angles, dtype)))
            else:
                table = sincos_2d(hidden_size, height, width).to(device, dtype)
            self._position_cache[key] = table
        return self._position_cache[key]

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patches (B, N, C*p*p) in (C, p, p) order (as F.unfold)."""
        B, C, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(B, (H // p) * (W // p), C * p * p)  # one copy, contiguous

    def _embed(self, embedder: PatchEmbed, patches: torch.Tensor, x: torch.Tensor,
               size: tuple[int, int] | None = None) -> tuple[torch.Tensor, Rope | None]:
        """Patch tokens (+ sin-cos positions) and the RoPE tables the blocks of `size` apply (None for sin-cos)."""
        p = self.patch_size
        positions = self.positions(x.shape[2] // p, x.shape[3] // p, x.device,
                                   torch.promote_types(x.dtype, torch.float32), size)
        if self.pos == "rope":
            return embedder(patches), positions
        return embedder(patches) + positions.to(patches.dtype), None

    def _unpatchify(self, out: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """(B, N, C*p*p) patch values back to (B, C, H, W): the inverse of _patches, one copy."""
        (H, W), p, C = size, self.patch_size, self.in_channels
        out = out.reshape(out.shape[0], H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(out.shape[0], C, H, W)


def _constructor_defaults() -> dict:
    """The network's constructor arguments (those of `_Transformer`), each with its default (None if required)."""
    params = list(inspect.signature(_Transformer.__init__).parameters.values())[1:]  # not self
    return {p.name: None if p.default is p.empty else p.default for p in params}


class DDT(_Transformer):
    """Condition encoder (blocks[:encoder_depth]) + velocity decoder (blocks[encoder_depth:])."""

    arch = "ddt"

    def __init__(self, *, encoder_depth: int, **kwargs):
        super().__init__(encoder_depth=encoder_depth, **kwargs)
        if split := split_problem(self.depth, encoder_depth):
            raise ValueError(split)
        self.encoder_depth = encoder_depth
        width = self.decoder_size[0]  # s enters a wider (or narrower) head through one linear map, as RAE's
        self.s_projector = nn.Linear(self.hidden_size, width) if width != self.hidden_size else nn.Identity()
        self.initialize_weights()

    @property
    def decoder_depth(self) -> int:
        """The decoder's blocks (ddt.schema.decoder_depth, as the config derives model.decoder_depth)."""
        return decoder_depth(self.depth, self.encoder_depth)

    def _encode(self, x: torch.Tensor, patches: torch.Tensor, t_emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = F.silu(t_emb + self.y_embedder(y)[:, None])  # (B, 1, D), one condition per sample
        h, rope = self._embed(self.s_embedder, patches, x)
        for block in self.blocks[: self.encoder_depth]:
            h = self._block(block, h, c, rope)
        return h

    def _decode(self, x: torch.Tensor, patches: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = self.s_projector(s)  # (B, N, W): the head's per-token condition (s itself when W = D)
        h, rope = self._embed(self.x_embedder, patches, x, self.decoder_size)
        for block in self.blocks[self.encoder_depth:]:
            h = self._block(block, h, s, rope)
        return self._unpatchify(self.final_layer(h, s), x.shape[2:])  # final layer: (B, N, C*p*p)

    def encoder_output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The condition encoder's last hidden state h (B, N, D), before the timestep is added."""
        return self._encode(x, self._patches(x), self.t_embedder(t.reshape(-1))[:, None], y)

    def self_condition(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s = SiLU(t_emb + h): the per-token condition of the decoder at time t."""
        return F.silu(self.t_embedder(t.reshape(-1))[:, None] + h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity for x (B, C, H, W) at times t (B,) and labels y (B,); pass s (B, N, D) to skip the encoder."""
        patches = self._patches(x)
        if s is None:
            t_emb = self.t_embedder(t.reshape(-1))[:, None]  # (B, 1, D)
            s = F.silu(t_emb + self._encode(x, patches, t_emb, y))  # (B, N, D), one per token
        return PREDICTIONS[self.prediction].velocity(self._decode(x, patches, s), x, t), s

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


class SiT(_Transformer):
    """Improved-SiT: one stack of DDT blocks, all (and the final layer) modulated by SiLU(t_emb + y_emb)."""

    arch = "sit"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.initialize_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                s: None = None) -> tuple[torch.Tensor, None]:
        """Velocity for x (B, C, H, W); the second output is None (there is no self-condition)."""
        if s is not None:
            raise ValueError("SiT has no condition encoder: there is no self-condition s to reuse")
        c = F.silu(self.t_embedder(t.reshape(-1))[:, None] + self.y_embedder(y)[:, None])  # (B, 1, D)
        h, rope = self._embed(self.x_embedder, self._patches(x), x)
        for block in self.blocks:
            h = self._block(block, h, c, rope)
        out = self._unpatchify(self.final_layer(h, c), x.shape[2:])
        return PREDICTIONS[self.prediction].velocity(out, x, t), None


ARCHS = {"ddt": DDT, "sit": SiT}


def compile_model(model: DDT | SiT, enabled: bool = True) -> DDT | SiT:
    """The suite's torch.compile (train.compile, sampler.compile): in place, parameter names unchanged;
    enabled=False undoes it.

    Regional compilation: every block is compiled, and blocks of one width and condition shape share
    a graph (encoder blocks, decoder blocks; a wide decoder head adds one graph for its width). It
    compiles in about a tenth of the time of the whole model, the embedders and the sharing logic
    stay eager, and forward hooks on blocks (REPA, the dispersive loss) run outside the graphs, so
    adding and removing them each step recompiles nothing.
    """
    for block in model.blocks:
        if enabled:
            block.compile()
        else:
            block._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
    return model


def build_model(arch: str = "ddt", **kwargs) -> DDT | SiT:
    """`ddt` (decoupled; needs encoder_depth) or `sit` (one undivided stack; encoder_depth is ignored)."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is unknown; use one of {sorted(ARCHS)}")
    if not has_encoder(arch):
        kwargs.pop("encoder_depth", None)
    return ARCHS[arch](**kwargs)


def model_from_config(model: Mapping, **top_level) -> DDT | SiT:
    """The network a `model` config group describes (the group's other keys, e.g. preset, size no network);
    `top_level` passes the config's own network keys."""
    return build_model(model["arch"], **{k: model[k] for k in _constructor_defaults() if k in model}, **top_level)
