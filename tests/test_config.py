"""Configuration system: defaults, every shipped YAML, overrides, and one-line errors from the scripts."""
import glob
import inspect
import os

import pytest

from configs import config_value, declare_config, get_cfg_defaults, load_config, read_config, schema
from configs import defaults as configs_defaults
from configs.compat import REFERENCE_ONLY_KEYS
from configs.schema import add_declared_keys, declarations
from tests.fixtures import REPO_ROOT, run_script
from utils.errors import ConfigError
from utils.registry import RegistryError

ALL_YAML = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yml"), recursive=True))


def test_defaults_load_and_are_documented():
    cfg = get_cfg_defaults()
    assert cfg.MODEL.DEVICE == "auto"
    assert cfg.MODEL.NO_MARGIN is True  # the reference's effective default
    assert cfg.SOLVER.SEED == 1111
    source = open(os.path.join(REPO_ROOT, "configs", "defaults.py"), encoding="utf-8").read().splitlines()
    # Every key assignment has a comment on its line, or sits in a block of assignments under a comment.
    for index, line in enumerate(source):
        stripped = line.strip()
        if not stripped.startswith("_C.") or "CN()" in stripped or "#" in stripped:
            continue
        above = index - 1
        while above >= 0 and source[above].strip().startswith("_C.") and "CN()" not in source[above]:
            above -= 1
        assert source[above].strip().startswith("#"), f"configs/defaults.py line {index + 1} has no comment"


@pytest.mark.parametrize("path", ALL_YAML, ids=[os.path.relpath(p, REPO_ROOT) for p in ALL_YAML])
def test_every_shipped_yaml_merges(path):
    cfg = load_config(path)
    assert cfg.is_frozen()


def test_at_least_the_quickstart_config_exists():
    assert os.path.join(REPO_ROOT, "configs", "Synthetic", "svpr_reid.yml") in ALL_YAML


def test_overrides_apply_with_types():
    cfg = load_config(None, ["SOLVER.MAX_EPOCHS", "7", "MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[64, 32]",
                             "INPUT.SIZE_TEST", "[64, 32]", "DATASETS.TESTS", "('A', 'B')"])
    assert cfg.SOLVER.MAX_EPOCHS == 7
    assert cfg.MODEL.DEVICE == "cpu"
    assert list(cfg.INPUT.SIZE_TRAIN) == [64, 32]
    assert tuple(cfg.DATASETS.TESTS) == ("A", "B")


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.MAX_EPOCH", "3"], "SOLVER.MAX_EPOCH"),
    (["SOLVER.MAX_EPOCHS", "'ten'"], "SOLVER.MAX_EPOCHS"),
    (["MODEL.DEVICE", "tpu"], "MODEL.DEVICE"),
    (["SOLVER.MAX_EPOCHS"], "KEY VALUE"),
    (["TEST.TIME_MODE", "sometimes"], "TEST.TIME_MODE"),
])
def test_bad_overrides_raise_config_error(opts, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, opts)


def test_bad_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("SOLVER:\n  MAX_EPOCHZ: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and "SOLVER.MAX_EPOCHZ" in str(info.value)


def test_unknown_keys_name_the_closest_existing_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_EPOCH; did you mean SOLVER\.MAX_EPOCHS"):
        load_config(None, ["SOLVER.MAX_EPOCH", "3"])
    path = tmp_path / "misplaced.yml"
    path.write_text("MODEL:\n  MAX_EPOCHS: 3\n")  # right key, wrong section
    with pytest.raises(ConfigError, match=r"MODEL\.MAX_EPOCHS; did you mean SOLVER\.MAX_EPOCHS"):
        load_config(str(path))


def test_reference_only_keys_are_ignored_with_one_warning(tmp_path, caplog):
    """A YAML file in the reference's style (keys the reference never reads) loads; one warning names them."""
    path = tmp_path / "reference_style.yml"
    path.write_text("MODEL:\n  DEVICE_ID: ('1')\n  NECK: 'bnneck'\n  COS_LAYER: False\n"
                    "SOLVER:\n  LR_MIN: 1.6e-5\n  STAGE1:\n    COSINE_SCALE: 30\n  MAX_EPOCHS: 3\n"
                    "TEST:\n  NECK_FEAT: 'before'\n")
    cfg, ignored = read_config(str(path), ["DATALOADER.AUG", "True"])
    assert cfg.SOLVER.MAX_EPOCHS == 3
    assert sorted(ignored) == ["DATALOADER.AUG", "MODEL.COS_LAYER", "MODEL.DEVICE_ID", "MODEL.NECK",
                               "SOLVER.LR_MIN", "SOLVER.STAGE1.COSINE_SCALE", "TEST.NECK_FEAT"]
    for key in REFERENCE_ONLY_KEYS:
        with pytest.raises(KeyError):
            config_value(get_cfg_defaults(), key)
    with caplog.at_level("WARNING"):
        load_config(str(path))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MODEL.DEVICE_ID" in warnings[0].getMessage()


@pytest.mark.parametrize("name, text, message", [
    ("config.py", "import os\nos.system('touch pwned')\n", "expected a YAML file"),
    ("list.yml", "- MODEL\n- SOLVER\n", "expected a mapping"),
])
def test_non_yaml_or_non_mapping_config_is_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
    assert not (tmp_path / "pwned").exists()


def test_a_saved_config_reloads_to_the_same_config(tmp_path):
    """``OUTPUT_DIR/config.yaml`` (``cfg.dump()``) loads back to an identical config."""
    cfg = load_config(os.path.join(REPO_ROOT, "configs", "CP2108", "svpr_reid.yml"), ["SOLVER.MAX_EPOCHS", "7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    assert load_config(str(path)) == cfg


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("script", ["train_svpr.py", "test_svpr.py"])
def test_scripts_report_bad_key_type_and_file(script, tmp_path):
    out = str(tmp_path / "out")
    _assert_one_line_error(run_script([script, "SOLVER.NOT_A_KEY", "1", "OUTPUT_DIR", out]), "SOLVER.NOT_A_KEY")
    _assert_one_line_error(run_script([script, "SOLVER.MAX_EPOCHS", "'x'", "OUTPUT_DIR", out]),
                           "SOLVER.MAX_EPOCHS")
    missing = str(tmp_path / "nope.yml")
    _assert_one_line_error(run_script([script, "--config_file", missing]), missing)
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("MODEL: [unclosed\n")
    _assert_one_line_error(run_script([script, "--config_file", str(bad_yaml)]), str(bad_yaml))


# ------------------------------------------------------------------------- keys declared by their components
def test_component_keys_are_declared_next_to_their_code_with_a_comment():
    """Each component's keys come from its own module, and every declared key is documented there."""
    cfg = configs_defaults._C.clone()
    owners = add_declared_keys(cfg)
    assert owners["MODEL.SVPR.CVPR_TOPK"] == "model.svpr.model"
    assert owners["MODEL.JPM.SHIFT"] == "model.vit.transreid"
    assert owners["SOLVER.STAGE1.BASE_LR"].startswith("model.clip_reid")
    assert owners["DATASETS.SYNTH.NUM_IDS"] == "datasets.synthag"
    assert owners["MODEL.FIXES.VIEW_LOSS_SMOOTHING"].startswith("loss.")
    assert owners["SOLVER.SEED"] == "configs.defaults"
    defaults_source = open(os.path.join(REPO_ROOT, "configs", "defaults.py"), encoding="utf-8").read()
    for key, owner in owners.items():
        if owner != "configs.defaults":
            assert f"_C.{key} " not in defaults_source, f"{key} is defined in configs/defaults.py and in {owner}"
    for declaration in declarations():
        source = inspect.getsource(declaration.add).splitlines()
        for index, line in enumerate(source):
            stripped = line.strip()
            if not stripped.startswith("cfg.") or "CN()" in stripped or "#" in stripped:
                continue
            above = index - 1
            while source[above].strip().startswith("cfg.") and "CN()" not in source[above]:
                above -= 1
            assert source[above].strip().startswith("#"), f"{declaration.owner}: '{stripped}' has no comment"


def test_a_key_declared_twice_names_both_owners():
    def add_clash(cfg):
        # A second definition of a framework key.
        cfg.SOLVER.SEED = 7

    add_clash.__module__ = "tests.clash"
    declare_config(add_clash)
    try:
        with pytest.raises(RegistryError, match=r"SOLVER\.SEED.*configs\.defaults.*tests\.clash"):
            get_cfg_defaults()
    finally:
        schema._DECLARATIONS.pop(("tests.clash", add_clash.__qualname__))
    assert get_cfg_defaults().SOLVER.SEED == 1111


def test_a_declared_check_runs_on_every_merge():
    with pytest.raises(ConfigError, match=r"SOLVER\.STAGE1\.IMS_PER_BATCH = 0"):
        load_config(None, ["SOLVER.STAGE1.IMS_PER_BATCH", "0"])
    with pytest.raises(ConfigError, match=r"MODEL\.IF_LABELSMOOTH = 'maybe'"):
        load_config(None, ["MODEL.IF_LABELSMOOTH", "maybe"])


# ------------------------------------------------------------------------------------------- _BASE_ files
SHIPPED = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.yml"))
                 + glob.glob(os.path.join(REPO_ROOT, "configs", "*", "*.yml")))


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, REPO_ROOT) for p in SHIPPED])
def test_no_shipped_config_gives_reference_only_keys(path):
    """Shipped configs state only keys that do something: loading them prints no warning."""
    _, ignored = read_config(path)
    assert ignored == []


def test_base_files_inherit_over_several_levels_with_relative_paths(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "bases" / "root.yml").write_text("SOLVER:\n  MAX_EPOCHS: 7\n  BASE_LR: 0.5\nTEST:\n  MAX_RANK: 9\n")
    (tmp_path / "bases" / "middle.yml").write_text("_BASE_: root.yml\nSOLVER:\n  BASE_LR: 0.25\n")
    (tmp_path / "runs" / "run.yml").write_text("_BASE_: ../bases/middle.yml\nTEST:\n  MAX_RANK: 3\n")
    cfg = load_config(str(tmp_path / "runs" / "run.yml"), ["SOLVER.MAX_EPOCHS", "2"])
    # The child wins over its base, the base over the root, the command line over every file.
    assert (cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.BASE_LR, cfg.TEST.MAX_RANK) == (2, 0.25, 3)
    assert "_BASE_" not in cfg.dump()


@pytest.mark.parametrize("content, message", [
    ("_BASE_: missing.yml\n", "missing.yml not found"),
    ("_BASE_: https://example.com/base.yml\n", "never downloaded"),
    ("_BASE_: [a.yml]\n", "expected the path of a YAML file"),
    ("_BASE_: run.yml\n", "makes a cycle"),
])
def test_bad_base_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "run.yml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_unknown_key_in_a_base_names_the_base_file(tmp_path):
    (tmp_path / "base.yml").write_text("SOLVER:\n  MAX_EPOCH: 3\n")
    (tmp_path / "run.yml").write_text("_BASE_: base.yml\n")
    with pytest.raises(ConfigError, match=r"base\.yml: unknown config key SOLVER\.MAX_EPOCH; did you mean "
                                          r"SOLVER\.MAX_EPOCHS"):
        load_config(str(tmp_path / "run.yml"))
