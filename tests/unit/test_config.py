import pytest

from clipscale.config import Config, ConfigError, load_config, load_sweep, validate_for_world


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_tiny_run():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "clipscale-tiny"
    assert cfg.train.total_samples % cfg.train.global_batch_size == 0


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = write(tmp_path, "[train]\nglobal_batch_size = 64\ntotal_samples = 640\n[optim]\nlr_peak = 5e-4\n")
    cfg = load_config(recipe, ["train.global_batch_size=32", "run.name=x"])
    assert cfg.train.global_batch_size == 32  # override beats recipe
    assert cfg.train.total_samples == 640  # recipe beats default
    assert cfg.optim.lr_peak == 5e-4
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # default kept
    assert cfg.run.name == "x"


def test_int_accepted_for_float_and_none_for_optional(tmp_path):
    cfg = load_config(None, ["optim.lr_peak=1", "train.chunk_size=16"])
    assert cfg.optim.lr_peak == 1.0 and isinstance(cfg.optim.lr_peak, float)
    assert cfg.train.chunk_size == 16


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.global_batchsize=3", "did you mean 'global_batch_size'"),
        ("trian.total_samples=3", "did you mean 'train'"),
        ("train.global_batch_size=abc", "train.global_batch_size"),
        ("train.global_batch_size=2.5", "expected int"),
        ("train.precision='fp8'", "got 'fp8', expected one of"),
        ("log.progress_bar=1", "log.progress_bar"),
        ("train=3", "'train' is a section"),
        ("novalue", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_recipe_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found: .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        load_config(write(tmp_path, "[model]\nwidht = 3\n"))


def test_cross_field_checks_say_what_to_set():
    cfg = load_config(None, ["train.global_batch_size=100"])
    with pytest.raises(ConfigError, match="not divisible by the world size 3; set it to a multiple of 3"):
        validate_for_world(cfg, 3)
    validate_for_world(cfg, 2)
    with pytest.raises(ConfigError, match="model.init_logit_bias"):
        validate_for_world(load_config(None, ["loss.kind='siglip'"]), 1)
    with pytest.raises(ConfigError, match="less than one global batch"):
        validate_for_world(load_config(None, ["train.total_samples=10"]), 1)


def test_sweep_is_the_product_of_axes(tmp_path):
    recipe = write(tmp_path, """
[run]
name = "grid"
[sweep]
model = [ { name = "s", "model.vision_width" = 32 }, { name = "m", "model.vision_width" = 64 } ]
samples = [ { name = "short", "train.total_samples" = 512 }, { name = "long", "train.total_samples" = 1024 } ]
""")
    runs = load_sweep(recipe)
    assert [name for name, _ in runs] == ["grid-s-short", "grid-s-long", "grid-m-short", "grid-m-long"]
    cfgs = {name: load_config(recipe, ovs) for name, ovs in runs}
    assert cfgs["grid-m-long"].model.vision_width == 64
    assert cfgs["grid-m-long"].train.total_samples == 1024
    assert cfgs["grid-m-long"].run.name == "grid-m-long"


def test_train_refuses_a_sweep_recipe_naming_the_sweep_command(tmp_path):
    recipe = write(tmp_path, '[run]\nname = "grid"\n[sweep]\nm = [ { "model.vision_width" = 32 } ]\n')
    with pytest.raises(ConfigError, match=f"{recipe} has a \\[sweep\\] table.*`clipscale sweep {recipe}`"):
        load_config(recipe, ["train.global_batch_size=32"])
    assert load_config(recipe, ["sweep={}"]).run.name == "grid"  # the base recipe, asked for explicitly


def test_sweep_with_bad_key_fails_before_any_run(tmp_path):
    recipe = write(tmp_path, '[sweep]\nm = [ { "model.vision_widht" = 3 } ]\n')
    with pytest.raises(ConfigError, match="did you mean 'vision_width'"):
        load_sweep(recipe)


@pytest.mark.parametrize("override, allowed", [
    ("train.log_every_steps=0", ">= 1"),
    ("train.max_nonfinite_steps=0", ">= 1"),
    ("train.keep_last=-1", ">= 0"),
    ("train.keep_every_samples=-64", ">= 0"),
    ("train.checkpoint_every_samples=-1", ">= 0"),
    ("eval.every_samples=-1", ">= 0"),
    ("train.global_batch_size=0", ">= 1"),
    ("train.chunk_size=0", ">= 1"),
    ("train.collective_timeout_s=0", "> 0"),
    ("train.num_threads=0", ">= 1"),
    ("optim.lr_peak=0", "> 0"),
    ("optim.warmup_samples=-1", ">= 0"),
    ("optim.beta2=1.0", "in [0, 1)"),
    ("optim.lr_min_ratio=1.5", "in [0, 1]"),
    ("optim.grad_clip_norm=0", "> 0"),
    ("model.patch_dropout=1.0", "in [0, 1)"),
    ("data.num_streams=0", ">= 1"),
    ("data.workers=-1", ">= 0"),
    ("data.max_bad_fraction=1.5", "in [0, 1]"),
    ("data.block_shards=0", ">= 1"),
    ("data.read_timeout_s=0", "> 0"),
    ("eval.batch_size=0", ">= 1"),
])
def test_every_range_is_checked_when_the_config_is_built(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{key}=")
    assert f"it must be {allowed}; set {key} to a value {allowed}" in str(err.value)


def test_combinations_are_checked_when_the_config_is_built():
    for overrides, needle in [
        (["train.total_samples=10"], "less than one global batch"),
        (["train.precision='fp16'", "train.parallel='fsdp'"], "FSDP2 needs a sharded grad scaler"),
        (["loss.kind='siglip'"], "set model.init_logit_bias=-10.0"),
        (["eval.every_samples=64", "train.parallel='fsdp'"], "clipscale eval RUN_DIR --watch"),
        (["optim.schedule='const-cooldown'", "optim.cooldown_samples=99999"], "shorten the cooldown"),
    ]:
        with pytest.raises(ConfigError, match=None) as err:
            load_config(None, overrides)
        assert needle in str(err.value)


def test_every_numeric_field_has_a_range():
    """A new numeric field must be added to RANGES (or be free of range, like seeds and logit inits)."""
    import typing

    from clipscale.config import RANGES

    free = {"run.seed", "model.init_logit_scale", "model.init_logit_bias",
            "loss.tile_size", "eval.loss_batch_size"}  # LossConfig and EvalConfig check these themselves
    numeric = {f"{section}.{field}" for section, cls in typing.get_type_hints(Config).items()
               for field, tp in typing.get_type_hints(cls).items() if {int, float} & {tp, *typing.get_args(tp)}}
    assert numeric - free - set(RANGES) == set()


def test_sweep_points_are_validated_with_the_overrides_applied_to_every_run(tmp_path):
    """A point shorter than the recipe's batch is valid once the sweep's own overrides shrink the batch."""
    recipe = write(tmp_path, '[run]\nname = "g"\n[train]\nglobal_batch_size = 256\ntotal_samples = 512\n'
                             '[sweep]\nsamples = [{ name = "s64", "train.total_samples" = 64 }]\n')
    with pytest.raises(ConfigError, match="less than one global batch"):
        load_sweep(recipe)
    [(name, overrides)] = load_sweep(recipe, ["train.global_batch_size=32"])
    assert name == "g-s64" and load_config(recipe, [*overrides, "train.global_batch_size=32"]).train.total_samples == 64


def test_shipped_recipes_resolve_by_name_and_an_unknown_name_lists_them(tmp_path, monkeypatch):
    from clipscale.config import RECIPES

    monkeypatch.chdir(tmp_path)  # outside the repository
    assert load_config("vit_g14_laion2b").run.name == load_config("vit_g14_laion2b.toml").run.name == "vit_g14_laion2b"
    assert (RECIPES / "tiny_cpu.toml").is_file()
    with pytest.raises(ConfigError, match=r"recipe not found: nosuch; pass a TOML file or one of .*'tiny_cpu'"):
        load_config("nosuch")
