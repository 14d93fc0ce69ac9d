"""Parameter groups and the last layer's freeze."""

from __future__ import annotations

import torch

from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropWrapper
from dino.models.vision_transformer import vit
from dino.train.config import load_config
from dino.train.loop import train
from dino.train.optim import param_groups
from dino.train.setup import build_student_teacher

from .conftest import TINY_OVERRIDES


def test_biases_and_norm_parameters_get_no_weight_decay():
    """As the original: every bias and every LayerNorm / BatchNorm parameter is excluded from weight decay;
    the other weights, the [CLS] token, the position embeddings and the last layer's g and v are not."""
    model = MultiCropWrapper(vit("tiny", patch_size=8, img_size=32, depth=2), DINOHead(192, 64, 32, 16, use_bn=True,
                                                                                     norm_last_layer=False))  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in group["params"]} for group in param_groups(model))
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.BatchNorm1d)}
    expected_no_decay = {n for n in names.values() if n.endswith(".bias") or n.rsplit(".", 1)[0] in norms}
    assert no_decay == expected_no_decay
    assert decay == set(names.values()) - expected_no_decay
    assert {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.weight_g"} <= decay
    assert any(".norm" in n and n.endswith(".weight") for n in no_decay)  # the rule reaches norm weights
    assert param_groups(model)[1]["weight_decay"] == 0.0


def test_the_last_layer_stays_as_initialised_while_it_is_frozen(small_folder, tmp_path):
    cfg = load_config(
        None,
        TINY_OVERRIDES
        + [f"data.path={small_folder}", f"run.output_dir={tmp_path / 'run'}", "run.epochs=1",
           "head.freeze_last_layer=1", "head.norm_last_layer=false"],
    )  # fmt: skip
    initial, _ = build_student_teacher(cfg, torch.device("cpu"))
    train(cfg, resume=False)
    state = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("last-*.pth"))[-1], weights_only=True)
    trained = state["student"]
    before = {k.removeprefix("module."): v for k, v in initial.state_dict().items()}
    after = {k.removeprefix("module."): v for k, v in trained.items()}
    for key in ("head.last_layer.weight_v", "head.last_layer.weight_g"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["head.mlp.0.weight"], before["head.mlp.0.weight"])
