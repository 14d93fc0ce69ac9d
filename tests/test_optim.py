"""Parameter groups and the last layer's freeze."""

from __future__ import annotations

import pytest
import torch

from dino.config import load_config
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropWrapper
from dino.models.vision_transformer import vit
from dino.train.loop import train
from dino.train.optim import param_groups
from dino.train.setup import build_student_teacher

from .conftest import TINY_OVERRIDES
from .original_dino import original_run


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


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_resuming_the_originals_checkpoint_continues_its_adamw_state_by_name(tmp_path, norm_last_layer):
    """After 3 epochs of the original code (numpy lr / weight decay, the last layer frozen in the first, so
    its Adam step count lags the others), the next step from our resumed student and optimiser is the
    step the original takes. With norm_last_layer off, the original trains weight_g (registered before
    weight_v) and ours weight_v before weight_g: a load by position would swap their moments."""
    from dino import hub
    from dino.config import config_from_dict
    from dino.train.optim import build_optimizer, set_schedules
    from dino.train.setup import load_model_state_dict, load_released_optimizer, model_state_dict

    # No stochastic depth: the two students must compute the same function.
    run = original_run(
        norm_last_layer=norm_last_layer, epochs=6, warmup_epochs=1, epochs_done=3, drop_path_rate=0.0
    )
    saved = run.checkpoint["optimizer"]["state"]
    assert len({float(entry["step"]) for entry in saved.values()}) == 2  # the last layer lags
    torch.save(run.checkpoint, tmp_path / "full.pth")
    converted = hub.load_training_checkpoint(tmp_path / "full.pth")
    cfg = config_from_dict(converted["config"])
    assert cfg.head.norm_last_layer is norm_last_layer

    def resumed(with_state: bool):
        student, _ = build_student_teacher(cfg, torch.device("cpu"))
        load_model_state_dict(student, converted["student"])
        optimizer = build_optimizer(student, cfg.optim.name)
        if with_state:
            load_released_optimizer(optimizer, cfg.optim.name, student, converted["released_optimizer"])
        return student, optimizer

    student, optimizer = resumed(with_state=True)
    fresh_student, fresh_optimizer = resumed(with_state=False)
    epoch = int(converted["epoch"])
    it = epoch * run.niter_per_ep
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for model, opt in ((student, optimizer), (fresh_student, fresh_optimizer)):
        set_schedules(opt, float(run.lr_schedule[it]), float(run.wd_schedule[it]))
        opt.zero_grad()
        run.loss(lambda images, m=model: m.head(m.backbone(images)), x).backward()
        opt.step()
    before = {k.removeprefix("module."): v.clone() for k, v in run.student.state_dict().items()}
    run.step(it, x, epoch)
    original = {k.removeprefix("module."): v for k, v in run.student.state_dict().items()}
    ours, fresh = model_state_dict(student), model_state_dict(fresh_student)
    for name, value in original.items():
        got, want = ours[name], value
        if name.endswith("attn.qkv.bias"):
            # The key bias gets no gradient in exact arithmetic (the softmax ignores a shift shared by
            # every key), so Adam's normalised update of it is rounding noise: left out.
            dim = got.shape[0] // 3
            got, want = torch.cat((got[:dim], got[2 * dim :])), torch.cat((want[:dim], want[2 * dim :]))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # steps here are ~1e-4
    # The test can tell: without the original's moments the same step lands farther from the original's
    # than the original's step is long (1.7-1.8 times here).
    for name in ("backbone.blocks.0.mlp.fc1.weight", "head.last_layer.weight_v"):
        moved = (original[name] - before[name]).abs().max()
        assert (fresh[name] - original[name]).abs().max() > moved
