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
    torch.testing.assert_close(lin.weight_g.squeeze(1), lin.weight_v.norm(dim=1))
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
