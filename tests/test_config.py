import pytest

from aa_compile import Config
from aa_compile.passes.pipeline import PIPELINE


def test_defaults_enable_every_default_pass():
    cfg = Config()
    assert cfg.inner_compiler == "inductor"
    assert cfg.enabled_passes() == [p.name for p in PIPELINE if p.default_enabled]


def test_from_options_accepts_dict_and_config():
    cfg = Config.from_options({"inner_compiler": "eager", "disable": ["rms_norm"]})
    assert cfg.inner_compiler == "eager"
    assert cfg.disable == ("rms_norm",)
    want = [p.name for p in PIPELINE if p.default_enabled and p.name != "rms_norm"]
    assert cfg.enabled_passes() == want
    assert "rms_norm" not in want and "embedding_bag" in want
    assert Config.from_options(cfg) is cfg
    assert Config.from_options(None) == Config()


def test_unknown_option_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\].*inner_compiler"):
        Config.from_options({"bogus": 1})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inner_compiler": "nope"}, r"inner_compiler='nope'.*\['inductor', 'eager'"),
        ({"passes": ["no_such_pass"]}, r"unknown pass name\(s\) \['no_such_pass'\].*rms_norm"),
        ({"disable": ["no_such_pass"]}, r"unknown pass name"),
        ({"passes": "rms_norm"}, r"passes must be a list of pass names"),
        ({"strict": "yes"}, r"strict must be True or False"),
        ({"mode": "fastest"}, r"mode='fastest' is not valid"),
        ({"inductor_options": ["x"]}, r"inductor_options must be a dict"),
    ],
)
def test_bad_values_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options(options)


def test_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="options must be a dict"):
        Config.from_options(["inner_compiler"])


def test_passes_run_in_pipeline_order_without_duplicates():
    cfg = Config(passes=("rms_norm", "rms_norm"))
    assert cfg.enabled_passes() == ["rms_norm"]


def test_key_changes_with_enabled_passes():
    assert Config().key() != Config(disable=("rms_norm",)).key()
    assert Config().key() == Config().key()


def test_fp8_options_default_off_and_validated():
    cfg = Config()
    assert cfg.fp8 is None and cfg.fp8_keep == ("o_proj", "down_proj", "lm_head")
    cfg = Config.from_options({"fp8": "rowwise", "fp8_keep": ["lm_head"]})
    assert cfg.fp8 == "rowwise" and cfg.fp8_keep == ("lm_head",)
    assert Config(fp8_keep=[]).fp8_keep == ()
    with pytest.raises(ValueError, match=r"fp8='fp8' is not valid; choose one of \[None, 'static'"):
        Config(fp8="fp8")
    with pytest.raises(ValueError, match=r"fp8_keep must be a list of module names"):
        Config(fp8_keep="o_proj")


def test_key_changes_with_fp8_options():
    assert Config().key() != Config(fp8="static").key()
    assert Config(fp8="static").key() != Config(fp8="static", fp8_keep=()).key()
