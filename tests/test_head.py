import torch

from dino.models.head import DINOHead, WeightNormLinear
from dino.models.multicrop import MultiCropWrapper, group_by_resolution


def test_released_key_layout():
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    assert set(head.state_dict()) == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v",
    }  # fmt: skip
    assert head.last_layer.weight_g.shape == (100, 1) and head.last_layer.weight_v.shape == (100, 16)


def test_output_is_cosine_to_unit_prototypes_when_norm_fixed():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=50, hidden_dim=64, bottleneck_dim=16, norm_last_layer=True)
    x = torch.randn(8, 32)
    out = head(x)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    prototypes = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z @ prototypes.T)
    assert out.abs().max() <= 1.0 + 1e-5  # cosine similarities
    assert not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))


def test_trainable_norm_and_bn_variant():
    lin = WeightNormLinear(4, 3, fix_norm=False)
    assert lin.weight_g.requires_grad
    # As the original: g starts at 1 (unit rows) whether or not it trains
    torch.testing.assert_close(lin.weight_g, torch.ones(3, 1))
    torch.testing.assert_close(lin.weight.norm(dim=1), torch.ones(3))
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, nlayers=2, use_bn=True)
    assert isinstance(head.mlp[1], torch.nn.BatchNorm1d)
    assert head(torch.randn(5, 8)).shape == (5, 10)


def test_multicrop_groups_by_resolution_and_keeps_order():
    crops = [
        torch.randn(2, 3, 8, 8),
        torch.randn(2, 3, 8, 8),
        torch.randn(2, 3, 4, 4),
        torch.randn(2, 3, 4, 4),
    ]
    assert group_by_resolution(crops) == [(0, 2), (2, 4)]
    calls = []

    class Backbone(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Backbone(), torch.nn.Identity())
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (4, 3, 4, 4)]  # one forward per resolution
    expected = torch.cat([c.mean(dim=(2, 3)) for c in crops])
    torch.testing.assert_close(out, expected)


def test_weight_norm_layer_gives_the_same_outputs_and_gradients_for_few_and_many_rows():
    """Fewer rows than input features scale the output instead of the weight: the same function."""
    torch.manual_seed(0)
    for fix_norm in (True, False):
        lin = WeightNormLinear(16, 40, fix_norm=fix_norm)
        if not fix_norm:  # gains other than the norms
            with torch.no_grad():
                lin.weight_g.mul_(torch.rand_like(lin.weight_g) + 0.5)
        for rows in (3, 16, 50):  # the first below in_dim (output scaling), the others not
            x = torch.randn(rows, 16, requires_grad=True)
            out = lin(x)
            grad = torch.randn_like(out)
            out.backward(grad)
            got = (out.detach(), x.grad, lin.weight_v.grad.clone())
            got_g = None if fix_norm else lin.weight_g.grad.clone()
            x.grad = None
            lin.zero_grad(set_to_none=True)
            reference = x @ (lin.weight_g * lin.weight_v / lin.weight_v.norm(dim=1, keepdim=True)).T
            reference.backward(grad)
            torch.testing.assert_close(got[0], reference.detach())
            torch.testing.assert_close(got[1], x.grad)
            torch.testing.assert_close(got[2], lin.weight_v.grad)
            if not fix_norm:
                torch.testing.assert_close(got_g, lin.weight_g.grad)
            lin.zero_grad(set_to_none=True)


def test_the_last_layer_starts_from_nn_linear_initialisation():
    """v as nn.Linear(256, K, bias=False)'s default weight (uniform in ±1/√256): its row norms (≈ 1/√3) set
    how far each optimiser step turns a prototype, so a different scale would change the recipe."""
    torch.manual_seed(0)
    v = WeightNormLinear(256, 4096).weight_v.detach()
    bound = 1 / 256**0.5
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    assert abs(v.norm(dim=1).mean().item() - 3**-0.5) < 0.01
