import pytest

from dino.config import (
    ConfigError,
    DINOConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
)


def test_defaults_are_the_papers_vit_s16_recipe():
    cfg = load_config()
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.drop_path_rate) == ("vit_small", 16, 0.1)
    assert (cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim, cfg.head.nlayers) == (
        65536,
        2048,
        256,
        3,
    )
    assert cfg.head.norm_last_layer and cfg.head.freeze_last_layer == 1 and not cfg.head.use_bn
    assert (cfg.loss.student_temp, cfg.loss.center_momentum) == (0.1, 0.9)
    # the paper: teacher temperature warmed up linearly from 0.04 to 0.07 during the first 30 epochs
    lo = cfg.loss
    assert (lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (cfg.teacher.momentum, cfg.teacher.final_momentum) == (0.996, 1.0)
    o = cfg.optim
    assert (o.name, o.lr, o.min_lr, o.warmup_epochs, o.weight_decay, o.weight_decay_end, o.clip_grad) == (
        "adamw", 0.0005, 1e-6, 10, 0.04, 0.4, 3.0)  # fmt: skip
    d = cfg.data
    assert d.global_crops_scale == [0.4, 1.0] and d.local_crops_scale == [0.05, 0.4]
    assert (d.global_crop_size, d.local_crop_size, d.local_crops_number) == (224, 96, 8)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    assert isinstance(load_config(name), DINOConfig)


# The released checkpoints' saved arguments (the original repository's args files) and the boosted command of
# its README: lr, min_lr, clip, warm-up epochs of the teacher temperature, norm_last_layer, freeze_last_layer,
# crop scales, local crops, epochs.
PUBLISHED = {
    "vit_small_300ep_boosted": (5e-4, 1e-6, 3.0, 30, False, 1, (0.4, 0.05, 0.4), 8, 300),
    "vit_small_800ep": (5e-4, 1e-5, 0.0, 30, False, 1, (0.25, 0.05, 0.25), 10, 800),
    "vit_base16": (7.5e-4, 2e-6, 0.3, 50, True, 3, (0.25, 0.05, 0.25), 10, 400),
    "vit_small8": (5e-4, 1e-6, 3.0, 30, False, 1, (0.4, 0.05, 0.4), 10, 800),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_paper_presets_match_the_released_settings(name):
    cfg = load_config(name)
    o, lo, h, d = cfg.optim, cfg.loss, cfg.head, cfg.data
    scales = (d.global_crops_scale[0], d.local_crops_scale[0], d.local_crops_scale[1])
    got = (o.lr, o.min_lr, o.clip_grad, lo.warmup_teacher_temp_epochs, h.norm_last_layer,
           h.freeze_last_layer, scales, d.local_crops_number, cfg.run.epochs)  # fmt: skip
    assert got == PUBLISHED[name]
    assert (lo.warmup_teacher_temp, lo.teacher_temp, cfg.teacher.momentum) == (0.04, 0.07, 0.996)
    assert (o.weight_decay, o.weight_decay_end, o.warmup_epochs, o.name) == (0.04, 0.4, 10, "adamw")


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("cifar_small", ["run.epochs=3", "optim.lr=0.01", "data.local_crops_number=0"])
    assert (cfg.run.epochs, cfg.optim.lr, cfg.data.local_crops_number) == (3, 0.01, 0)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.arch=vit_huge", "model.arch"),
        ("model.patch_size=0", "model.patch_size"),
        ("head.out_dim=1", "head.out_dim"),
        ("loss.teacher_temp=0", "loss.teacher_temp"),
        ("loss.center_momentum=1.0", "loss.center_momentum"),
        ("teacher.momentum=1.5", "teacher.momentum"),
        ("teacher.mode=frozen", "teacher.mode"),
        ("optim.name=adam", "optim.name"),
        ("optim.lr=-1", "optim.lr"),
        ("data.global_crops_scale=[0.5,0.4]", "data.global_crops_scale"),
        ("data.local_crop_size=8", "data.local_crop_size"),  # smaller than patch 16
        ("data.path=/definitely/not/here", "data.path"),
        ("run.batch_size=0", "run.batch_size"),
        ("run.precision=fp8", "run.precision"),
        ("run.device=tpu", "run.device"),
        # on a folder of one's own the held-out images must be named (the bundled sample has its own)
        ("[monitor.knn_every=1,data.path=/]", "monitor.knn_val"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
        ("data.blur_probs=[1.0,0.1]", "data.blur_probs"),
        ("data.solarize_prob=2", "data.solarize_prob"),
        ("data.augment_on=gpu", "data.augment_on"),
        ("run.compile_mode=cudagraphs", "run.compile_mode"),
        ("run.device=cudafoo", "run.device"),
        ("run.device=cuda:x", "run.device"),
        ("[run.precision=fp16,run.device=cpu]", "run.precision"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("optim.momentum=-0.1", "optim.momentum"),
        ("monitor.knn_resize=-5", "monitor.knn_resize"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    overrides = override.strip("[]").split(",") if override.startswith("[") else [override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("loss.teacher_norm", "softmax", "'centering', 'sinkhorn', 'batch_softmax', 'none'"),
        ("teacher.mode", "frozen", "'momentum', 'student', 'previous_iter', 'previous_epoch'"),
        ("optim.name", "adam", "'adamw', 'sgd', 'lars'"),
        ("data.augment_on", "gpu", "'auto', 'workers', 'device'"),
        ("run.precision", "fp8", "'auto', 'fp32', 'bf16', 'fp16'"),
        ("run.progress_bar", "sometimes", "'auto', 'always', 'never'"),
        ("run.compile_mode", "cudagraphs", "'default', 'reduce-overhead', 'max-autotune'"),
    ],
)
def test_a_value_outside_a_settings_choices_names_the_key_and_the_choices_in_one_line(
    tmp_path, key, value, allowed
):
    # OmegaConf checks the Literal-typed settings as it merges each source: overrides, YAML files and the
    # settings of a checkpoint alike
    section, name = key.split(".")
    preset = tmp_path / "bad.yaml"
    preset.write_text(f"{section}:\n  {name}: {value}\n")
    for config, overrides, base, origin in [
        (None, [f"{key}={value}"], None, "command line"),
        (preset, None, None, str(preset)),
        (None, None, {section: {name: value}}, "the checkpoint"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(config, overrides, base=base)
        message = str(err.value)
        assert message.startswith(f"{key}: ") and allowed in message and f"(from {origin})" in message
        assert repr(value) in message and "\n" not in message


def test_activation_checkpointing_is_refused_for_resnets_and_fractional_warmup_is_accepted():
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing.*vit_"):
        load_config("resnet50", ["model.activation_checkpointing=true"])
    assert load_config(None, ["optim.warmup_epochs=0.25"]).optim.warmup_epochs == 0.25


def test_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="model.archh"):
        load_config(None, ["model.archh=vit_small"])
    with pytest.raises(ConfigError, match="run.epochs"):
        load_config(None, ["run.epochs=many"])
    with pytest.raises(ConfigError, match="key=value|section.key=value"):
        load_config(None, ["run.epochs"])


def test_old_version_and_missing_file(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("version: 0\nmodel: {arch: vit_small}\n")
    with pytest.raises(ConfigError, match="version"):
        load_config(old)
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("no_such_preset")


def test_a_compiled_preset_turns_eager_with_run_compile_false_alone():
    # the way out that the compile toolchain check names: compile_mode stays, unused
    cfg = load_config("cifar_resnet18", ["run.compile=false"])
    assert cfg.run.compile is False and cfg.run.compile_mode == "reduce-overhead"
    assert load_config("cifar_resnet18").run.compile is True


def test_the_first_run_cpu_preset_is_pinned():
    """cifar_small is the README's first command; its figures (benchmarks/README.md, first_run.py) were
    measured with exactly these settings: a change here must be measured again."""
    cfg = load_config("cifar_small")
    m, h, lo, t, o, d, r = cfg.model, cfg.head, cfg.loss, cfg.teacher, cfg.optim, cfg.data, cfg.run
    assert (m.arch, m.drop_path_rate) == ("resnet10_w16_cifar", 0.0)
    assert (h.out_dim, h.hidden_dim, h.bottleneck_dim, h.use_bn, h.norm_last_layer, h.freeze_last_layer) == (
        1024, 512, 128, True, True, 0)  # fmt: skip
    assert (lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (lo.student_temp, lo.center_momentum, lo.teacher_norm) == (0.1, 0.9, "centering")
    assert (t.mode, t.momentum, t.final_momentum) == ("momentum", 0.96, 0.99)
    assert (o.name, o.lr, o.min_lr, o.warmup_epochs, o.weight_decay, o.weight_decay_end, o.clip_grad) == (
        "adamw", 0.008, 1e-5, 0.2, 0.04, 0.1, 3.0)  # fmt: skip
    assert (d.global_crops_scale, d.local_crops_scale, d.local_crops_number) == ([0.4, 1.0], [0.2, 0.5], 6)
    assert (d.global_crop_size, d.local_crop_size, d.blur_probs, d.solarize_prob) == (32, 16, [0.0] * 3, 0.2)
    assert (d.augment_on, d.in_memory, d.path) == ("device", True, None)
    assert (r.epochs, r.batch_size) == (12, 64)
    assert (cfg.monitor.knn_every, cfg.monitor.knn_val, cfg.monitor.knn_resize) == (1, None, 32)
