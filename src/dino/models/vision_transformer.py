"""Vision Transformer (DeiT design) as used by DINO.

Parameter names match the released DINO ViT files (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``) so those files load with
``strict=True``. Attention runs through ``scaled_dot_product_attention``; an explicit-softmax path returns
the attention weights for visualisation and can be forced for reference measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

VIT_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    # DINOv2's largest ViT-g/14 in width, depth and heads (1.1 B parameters), with the plain GELU MLP of the
    # other sizes: DINOv2's own has a SwiGLU MLP and layer scale, so its weights do not load into this one.
    "giant": (1536, 40, 24),
}


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole residual branches per sample, rescale the survivors."""
    scale = _branch_scale(x, drop_prob, training)
    return x if scale is None else x * scale


def _branch_scale(x: Tensor, drop_prob: float, training: bool) -> Tensor | None:
    """Per-sample factor of a residual branch under stochastic depth: 0 (dropped) or 1 / (1 - p), shaped
    to broadcast over ``x``; None when nothing is dropped."""
    if drop_prob == 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    # Drawn in float32 whatever x's dtype (the same draws in every precision), applied in x's dtype.
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=torch.float32).bernoulli_(keep)
    return (mask / keep).to(x.dtype)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def add_to(self, residual: Tensor, branch: Tensor) -> Tensor:
        """``residual + self(branch)`` in one kernel (the scaled add), rather than three."""
        scale = _branch_scale(branch, self.drop_prob, self.training)
        return residual + branch if scale is None else torch.addcmul(residual, branch, scale)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused (SDPA) path and an explicit path that exposes weights."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients once, where three
        # selects would each write a zero-filled full-size gradient and add them up.
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(
        self, x: Tensor, return_attention: bool = False, first_only: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attention outputs [B, N, C] (and the weights with ``return_attention``). ``first_only``: the
        first token's ([CLS]) output alone, [B, 1, C] — its query attends to every token's key and value,
        but no other token's query, scores or output is computed."""
        b, n, c = x.shape
        if not first_only:
            out, attn = self._attend(*self._qkv(x), return_attention)
            return self.proj(out.transpose(1, 2).reshape(b, n, c)), attn
        if return_attention:
            raise ValueError("first_only and return_attention cannot be combined")
        heads, weight, bias = self.num_heads, self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], weight[:c], None if bias is None else bias[:c])
        kv = F.linear(x, weight[c:], None if bias is None else bias[c:])
        k, v = kv.reshape(b, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out, _ = self._attend(q.reshape(b, 1, heads, c // heads).transpose(1, 2), k, v, False)
        return self.proj(out.transpose(1, 2).reshape(b, 1, c)), None

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, return_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        """softmax(q kᵀ / √d) v per head ([B, heads, tokens, d]); the weights too on the explicit path."""
        if self.fused and not return_attention:
            return F.scaled_dot_product_attention(q, k, v), None
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn @ v, attn


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: Tensor, return_attention: bool = False, first_only: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Tokens [B, N, D] out (and the attention weights with ``return_attention``). ``first_only``: the
        first token ([CLS]) alone, [B, 1, D] — the same values and stochastic-depth draws as
        ``forward(x)[0][:, :1]``, without the other tokens' attention and MLP (through ``__call__``, so
        module hooks see it like any other call)."""
        y, attn = self.attn(self.norm1(x), return_attention, first_only)
        x = self.drop_path.add_to(x[:, :1] if first_only else x, y)
        x = self.drop_path.add_to(x, self.mlp(self.norm2(x)))
        return x, attn


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each projected linearly: a convolution with kernel = stride = patch size.

    The weights are a ``Conv2d`` (``proj``, as in the released files), but the forward cuts the image into
    patches and runs one matrix product: the same arithmetic, which on GPUs is far faster than the
    strided convolution kernels picked for it in half precision. As with the convolution, pixels past
    the last whole patch are ignored.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        p = self.patch_size
        if channels != self.proj.in_channels:
            raise ValueError(
                f"input has {channels} channel(s) but the patch embedding takes {self.proj.in_channels}; "
                "convert images to RGB (grey-level: repeat the channel)"
            )
        rows, cols = height // p, width // p
        if rows == 0 or cols == 0:
            raise ValueError(f"input {height}x{width} is smaller than the patch size {p}")
        patches = x[:, :, : rows * p, : cols * p].reshape(batch, channels, rows, p, cols, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


@dataclass(frozen=True)
class ViTSpec:
    """What defines a ViT's parameter shapes (enough to rebuild it from a checkpoint)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int = 224
    mlp_ratio: float = 4.0
    in_chans: int = 3


class VisionTransformer(nn.Module):
    """ViT backbone returning the final-norm [CLS] token; ``head`` is identity (DINO adds its own)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if patch_size < 1 or img_size < patch_size:
            raise ValueError(f"patch_size must be in [1, img_size={img_size}], got {patch_size}")
        self.spec = ViTSpec(embed_dim, depth, num_heads, patch_size, img_size, mlp_ratio, in_chans)
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # numbers, also under meta
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.activation_checkpointing = False  # recompute each block in the backward pass: less memory
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def set_fused_attention(self, enabled: bool) -> None:
        """Switch every block between SDPA and the explicit-softmax attention (same maths)."""
        for module in self.blocks.modules():
            if isinstance(module, Attention):
                module.fused = enabled

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """Position embeddings for an input of ``height`` × ``width`` pixels (bicubic resampling).

        Returns the stored embeddings unchanged only for a square input on the native grid; any other input
        is resampled, even one whose grid matches (a 232 × 224 input is 14 × 14 patches of 16 px too), because
        the released implementation resamples there as well and features should match it at every size.
        """
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        n_stored = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(n_stored))
        if grid_h == side and grid_w == side and height == width:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, (grid_h, grid_w))

    def prepare_tokens(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        tokens = self.patch_embed(x)  # refuses inputs smaller than one patch
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(h, w).to(tokens.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm: [B, 1 + num_patches, D]."""
        return self.norm(self._run_blocks(self.prepare_tokens(x), len(self.blocks)))

    def forward(self, x: Tensor) -> Tensor:
        """The final-norm [CLS] token, [B, D] — ``forward_features(x)[:, 0]``, computed with less work: the
        last block only needs the other tokens' keys and values (a DINO ViT-S/16 training step with
        2×224² + 8×96² crops: 6.8 % fewer operations, forward and backward)."""
        if not self.blocks:
            return self.head(self.norm(self.prepare_tokens(x)[:, 0]))
        x = self._run_blocks(self.prepare_tokens(x), len(self.blocks) - 1)
        if self.activation_checkpointing and torch.is_grad_enabled():
            first = checkpoint(_block_first_token, self.blocks[-1], x, use_reentrant=False)
        else:
            first, _ = self.blocks[-1](x, first_only=True)
        return self.head(self.norm(first[:, 0]))

    def _run_blocks(self, x: Tensor, count: int) -> Tensor:
        """Tokens through the first ``count`` blocks, each recomputed in the backward pass when activation
        checkpointing is on (the stochastic-depth draws are replayed, so the recomputation is exact)."""
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks[:count]:
            if recompute:
                x = checkpoint(_block_tokens, block, x, use_reentrant=False)
            else:
                x, _ = block(x)
        return x

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Attention weights of the last block: [B, heads, 1 + N, 1 + N]."""
        x = self.prepare_tokens(x)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, attn = block(x, return_attention=last)
        assert attn is not None
        return attn

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Normalised token outputs of the last ``n`` blocks (oldest first), as in the released code."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x, _ = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


def _block_tokens(block: Block, x: Tensor) -> Tensor:
    return block(x)[0]


def _block_first_token(block: Block, x: Tensor) -> Tensor:
    return block(x, first_only=True)[0]


def resample_pos_embed(pos_embed: Tensor, grid: Sequence[int]) -> Tensor:
    """Bicubic resampling of [1, 1 + S*S, D] position embeddings (class token kept) to an h × w grid."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(patch_pos.shape[1]))
    if side * side != patch_pos.shape[1]:
        raise ValueError(f"stored position embeddings ({patch_pos.shape[1]} patches) are not a square grid")
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # Same sampling positions as the released implementation (scale factor with a +0.1 guard against
    # floating-point truncation), so features match it at every input size.
    scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
    patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(patch_pos.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"position-embedding resampling gave {tuple(patch_pos.shape[-2:])}, not {grid}")
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def vit(
    size: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0, depth: int = 0
) -> VisionTransformer:
    """Build ``vit_{tiny,small,base,large,giant}`` with any patch size (and optionally fewer or more blocks)."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    embed_dim, standard_depth, num_heads = VIT_SIZES[size]
    depth = depth or standard_depth
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        drop_path_rate=drop_path_rate,
    )
