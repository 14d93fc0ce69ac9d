import math

import pytest
import torch

from dino.models.vision_transformer import VIT_SIZES, VisionTransformer, resample_pos_embed, vit

RELEASED_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip


def tiny(**kw) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_parameter_names_match_released_layout():
    model = vit("small", 16, depth=2)
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in RELEASED_BLOCK_KEYS}
    assert set(model.state_dict()) == expected
    assert model.pos_embed.shape == (1, 14 * 14 + 1, 384)
    assert model.blocks[0].attn.qkv.bias is not None
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


@pytest.mark.parametrize("size", sorted(VIT_SIZES))
def test_sizes(size, monkeypatch):
    dim, depth, heads = VIT_SIZES[size]
    model = vit(size, patch_size=16, depth=1)
    assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)  # speed
    with torch.device("meta"):  # no memory: ViT-g has 1.1 billion parameters
        assert len(vit(size, patch_size=16).blocks) == depth  # the size's own depth by default


@pytest.mark.parametrize(
    ("size", "patch", "millions"),
    [("large", 16, 303.3), ("giant", 14, 1134.6)],
)
def test_large_and_giant_have_their_parameter_counts(size, patch, millions):
    """ViT-L/16 and ViT-g/14 (DINOv2's widths, depths and heads; a GELU MLP of ratio 4) at 224 px: the
    parameters add up as counted by hand — patch embedding 3·p²·D + D, [CLS] D, position embeddings
    (N + 1)·D, per block 12·D² + 13·D (qkv, projection, the MLP's two layers, two LayerNorms), final
    norm 2·D. ViT-L/16: timm's vit_large_patch16_224 without classifier has 303.3 M; ViT-g/14: DINOv2 gives
    1.1 B for its own (whose SwiGLU MLP of hidden width 4096 has as many weights as this 4·D GELU one)."""
    dim, depth, heads = VIT_SIZES[size]
    with torch.device("meta"):
        model = vit(size, patch_size=patch)
    n = (224 // patch) ** 2
    by_hand = (
        3 * patch * patch * dim + dim + dim + (n + 1) * dim + depth * (12 * dim * dim + 13 * dim) + 2 * dim
    )
    assert sum(p.numel() for p in model.parameters()) == by_hand
    assert by_hand / 1e6 == pytest.approx(millions, abs=0.1)
    assert model.blocks[0].attn.num_heads == heads and dim // heads == 64


def test_fused_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    fused = model(x)
    model.set_fused_attention(False)
    explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_attention_weights_by_hand():
    torch.manual_seed(0)
    model = tiny(depth=1)
    x = torch.randn(2, 3, 32, 32)
    attn = model.get_last_selfattention(x)
    tokens = model.blocks[0].norm1(model.prepare_tokens(x))
    qkv = model.blocks[0].attn.qkv(tokens).reshape(2, 17, 3, 3, 16)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(16)
    expected = logits.exp() / logits.exp().sum(-1, keepdim=True)
    assert attn.shape == (2, 3, 17, 17)
    torch.testing.assert_close(attn, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 17))


def test_pos_embed_identity_at_native_size_and_shapes_elsewhere():
    model = tiny()
    assert model.interpolate_pos_encoding(32, 32) is model.pos_embed
    assert model.interpolate_pos_encoding(48, 64).shape == (1, 1 + 6 * 8, 48)
    out = model.forward_features(torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 1 + 6 * 8, 48)


def _bicubic_1d(values: list[float], out_len: int, scale: float) -> list[float]:
    """PyTorch's bicubic (a = -0.75, half-pixel centres, edges clamped) at a given scale factor, by hand."""
    a = -0.75

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    out = []
    for i in range(out_len):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        t = src - base
        taps = [values[min(max(base + j, 0), len(values) - 1)] for j in (-1, 0, 1, 2)]
        out.append(sum(v * kernel(t - j) for v, j in zip(taps, (-1, 0, 1, 2), strict=True)))
    return out


def test_pos_embed_is_resampled_for_a_non_square_input_on_the_native_grid():
    """32 × 36 px is the native 4 × 4 grid of 8 px patches, but not square: the released implementation
    resamples there (scale factor (4 + 0.1) / 4 along each axis), so the embeddings change slightly."""
    model = tiny()
    rows = torch.tensor([0.0, 1.0, 4.0, 9.0])  # a field that varies down the rows only
    with torch.no_grad():
        model.pos_embed[0, 1:] = rows.repeat_interleave(4)[:, None].expand(16, 48)
    for height, width in ((32, 36), (36, 32)):
        out = model.interpolate_pos_encoding(height, width)
        assert out.shape == model.pos_embed.shape
        expected = _bicubic_1d(rows.tolist(), 4, 4.1 / 4)
        grid = out[0, 1:, 0].reshape(4, 4)
        torch.testing.assert_close(grid, torch.tensor(expected)[:, None].expand(4, 4))
        assert not torch.allclose(grid[:, 0], rows)
        assert torch.equal(out[:, 0], model.pos_embed[:, 0])


def test_resampling_a_constant_field_keeps_it_constant():
    pos = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 16, 4), 0.5)], dim=1)
    out = resample_pos_embed(pos, (7, 3))
    assert out.shape == (1, 22, 4)
    torch.testing.assert_close(out[:, 1:], torch.full((1, 21, 4), 0.5))
    assert torch.equal(out[:, 0], pos[:, 0])


def test_intermediate_layers_last_equals_forward():
    model = tiny(depth=3)
    x = torch.randn(2, 3, 32, 32)
    layers = model.get_intermediate_layers(x, 2)
    assert len(layers) == 2
    torch.testing.assert_close(layers[-1][:, 0], model(x))
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, 4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_forward_computes_the_last_block_for_the_class_token_only_with_the_same_results(fused, qkv_bias):
    """forward() skips the other tokens' queries, attention and MLP in the last block; its output, every
    gradient and the stochastic-depth draws are those of the whole last block."""
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.5, depth=3, qkv_bias=qkv_bias).train()
    model.set_fused_attention(fused)
    x = torch.randn(5, 3, 40, 32)  # a non-native grid too
    results = []
    for whole in (True, False):
        model.zero_grad()
        torch.manual_seed(1)
        out = model.forward_features(x)[:, 0] if whole else model(x)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        after = torch.rand(1)  # both consumed the same random draws
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()], after))
    (out_a, grads_a, after_a), (out_b, grads_b, after_b) = results
    assert grads_a[-1].abs().sum() > 0 and not torch.equal(out_a[0], out_a[1])
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        # Float32 sums in another order: gradients up to ~250 (cls_token, pos_embed) differ by ~3e-5.
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert torch.equal(after_a, after_b)
    with torch.no_grad():
        block = model.eval().blocks[-1]
        tokens = torch.randn(2, 7, 48)
        torch.testing.assert_close(block(tokens, first_only=True)[0], block(tokens)[0][:, :1])


def test_resampling_keeps_rows_as_rows_on_a_non_square_grid():
    """A field that grows down the rows (constant along them), resampled to 7 rows × 3 columns, still grows
    down the rows and stays constant along them; a swapped height and width would not."""
    rows = torch.arange(4.0).repeat_interleave(4).reshape(1, 16, 1).expand(1, 16, 2)
    pos = torch.cat([torch.zeros(1, 1, 2), rows], dim=1)
    grid = resample_pos_embed(pos, (7, 3))[0, 1:, 0].reshape(7, 3)
    torch.testing.assert_close(grid, grid[:, :1].expand(7, 3))
    assert (grid[1:, 0] > grid[:-1, 0]).all()


def test_stochastic_depth_keeps_the_activations_dtype():
    model = tiny(drop_path_rate=0.5, depth=2).to(torch.bfloat16).train()
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_wrong_channel_count_is_explained():
    with pytest.raises(ValueError, match="1 channel.*takes 3"):
        tiny()(torch.randn(1, 1, 32, 32))


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.5, depth=4)
    rates = [b.drop_path.drop_prob for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_input_smaller_than_patch_is_refused():
    with pytest.raises(ValueError, match="smaller than the patch"):
        tiny()(torch.randn(1, 3, 4, 4))


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.5, depth=4).train()  # stochastic depth: the recomputation must replay it
    x = torch.randn(6, 3, 32, 32)
    results = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no backward: nothing to recompute
        torch.testing.assert_close(model.eval()(x), model(x))


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (1, 3, 100, 70), (3, 3, 96, 96)])
def test_patch_embedding_equals_the_strided_convolution(shape):
    from dino.models.vision_transformer import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(224, 16, 3, 64)
    x = torch.randn(shape)
    expected = embed.proj(x).flatten(2).transpose(1, 2)  # the released code's patch embedding
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than the patch size 16"):
        embed(torch.randn(1, 3, 8, 40))
