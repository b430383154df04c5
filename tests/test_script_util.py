"""Flags and factories: help strings, the original ADDPM command lines, model + diffusion."""

import argparse
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from guided_diffusion.errors import ConfigError
from guided_diffusion.script_util import (
    HELP,
    add_dict_to_argparser,
    args_to_dict,
    create_gaussian_diffusion,
    create_model,
    create_model_and_diffusion,
    diffusion_config,
    diffusion_defaults,
    model_config,
    str2bool,
    training_defaults,
    unet_defaults,
)

# The original ADDPM README's flag strings, as users keep them in shell variables.
MODEL_FLAGS = (
    "--image_size 256 --num_channels 128 --class_cond False --num_res_blocks 2 --num_heads 1 "
    "--learn_sigma False --use_scale_shift_norm False --attention_resolutions 16"
)
DIFFUSION_FLAGS = (
    "--diffusion_steps 1000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False"
)
TRAIN_FLAGS = "--lr 1e-4 --batch_size 4"

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    num_channels=8,
    num_res_blocks=1,
    attention_resolutions="8",
    channel_mult="1,2",
    num_heads=2,
    diffusion_steps=20,
    noise_schedule="cosine",
)


def all_defaults():
    return {**unet_defaults(), **diffusion_defaults(), **training_defaults()}


def build_parser():
    parser = argparse.ArgumentParser()
    # --image_size belongs to the data flags (data.data_defaults); the test adds it alone.
    parser.add_argument("--image_size", type=int, default=256, help="image side")
    add_dict_to_argparser(parser, all_defaults(), HELP)
    return parser


def test_every_flag_has_a_help_string():
    for defaults in (unet_defaults(), diffusion_defaults(), training_defaults()):
        for key in defaults:
            assert HELP.get(key, "").strip(), key
    assert "image_size" not in unet_defaults()
    help_text = build_parser().format_help()
    assert "--use_fp16" in help_text and "--precision fp16" in help_text


def test_missing_help_is_an_error_when_the_parser_is_built():
    with pytest.raises(ValueError, match="undocumented"):
        add_dict_to_argparser(argparse.ArgumentParser(), {"undocumented": 1}, HELP)


def test_flag_defaults():
    assert unet_defaults()["num_heads"] == 4 and unet_defaults()["attention_resolutions"] == "16,8"
    assert diffusion_defaults()["rescale_timesteps"] is True
    assert diffusion_defaults()["mask_space"] == "pm1"
    assert training_defaults()["precision"] == "fp32" and training_defaults()["device"] == "auto"


@pytest.mark.parametrize("text", ["True", "true", "YES", "y", "1", "t"])
def test_str2bool_true(text):
    assert str2bool(text) is True


@pytest.mark.parametrize("text", ["False", "false", "no", "N", "0", "f"])
def test_str2bool_false(text):
    assert str2bool(text) is False


def test_str2bool_bad_value_is_a_clear_argparse_error(capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        str2bool("maybe")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--learn_sigma", "maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--learn_sigma" in err and "'maybe'" in err


def test_original_addpm_flag_strings_round_trip():
    argv = shlex.split(" ".join([TRAIN_FLAGS, MODEL_FLAGS, DIFFUSION_FLAGS]))
    args = build_parser().parse_args(argv)
    assert args.image_size == 256 and args.num_channels == 128 and args.num_heads == 1
    assert args.class_cond is False and args.learn_sigma is False
    assert args.use_scale_shift_norm is False and args.attention_resolutions == "16"
    assert args.noise_schedule == "cosine" and args.diffusion_steps == 1000
    assert args.rescale_learned_sigmas is False and args.rescale_timesteps is False
    assert args.lr == pytest.approx(1e-4) and isinstance(args.lr, float) and args.batch_size == 4
    # Untouched flags keep their defaults and their types.
    assert args.dropout == 0.0 and args.microbatch == -1 and args.ema_rate == "0.9999"

    picked = args_to_dict(args, unet_defaults().keys())
    assert set(picked) == set(unet_defaults())
    config = model_config(args, image_channels=4)
    assert config["image_size"] == 256 and config["image_channels"] == 4 and config["mask_channels"] == 1
    assert diffusion_config(args)["learn_sigma"] is False
    assert set(diffusion_config(args)) == set(diffusion_defaults()) | {"learn_sigma"}


def test_configs_rebuild_the_model_and_diffusion():
    args = build_parser().parse_args(
        shlex.split("--image_size 16 --num_channels 8 --num_res_blocks 1 --attention_resolutions 8 "
                    "--channel_mult 1,2 --num_heads 2 --diffusion_steps 20 --noise_schedule cosine "
                    "--learn_sigma True --timestep_respacing ddim5")
    )
    model = create_model(**model_config(args, image_channels=3))
    diffusion = create_gaussian_diffusion(**diffusion_config(args))
    assert model.in_channels == 4 and model.out_channels == 2
    assert diffusion.num_timesteps == 20  # respacing is a sampling-time option


def test_create_model_and_diffusion_builds_and_runs():
    model, diffusion = create_model_and_diffusion(image_size=16, image_channels=2, **TINY)
    assert model.in_channels == 3 and model.out_channels == 1
    assert diffusion.num_timesteps == 20
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0, 19])
    assert model(x, diffusion.scale_timesteps(t)).shape == (2, 1, 16, 16)

    model, _ = create_model_and_diffusion(
        image_size=16, image_channels=4, mask_channels=2, learn_sigma=True, **TINY
    )
    assert model.in_channels == 6 and model.out_channels == 4
    assert model(torch.randn(1, 6, 16, 16), torch.tensor([3])).shape == (1, 4, 16, 16)


def test_create_model_and_diffusion_rejects_unknown_flags():
    with pytest.raises(TypeError, match="num_chanels"):
        create_model_and_diffusion(image_size=16, image_channels=1, num_chanels=8)


def test_class_cond_is_refused():
    with pytest.raises(ConfigError, match="--class_cond True is not supported"):
        create_model_and_diffusion(image_size=16, image_channels=1, class_cond=True, **TINY)


def test_bad_diffusion_flags_are_config_errors():
    with pytest.raises(ConfigError, match="mask_space"):
        create_model_and_diffusion(image_size=16, image_channels=1, mask_space="0to1", **TINY)
    with pytest.raises(ConfigError):
        create_model_and_diffusion(image_size=16, image_channels=1, **{**TINY, "noise_schedule": "sqrt2"})


def run_python(code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_cli_turns_a_user_error_into_one_line_and_exit_2():
    result = run_python(
        """
        from guided_diffusion.errors import CheckpointError
        from guided_diffusion.script_util import run_cli

        def main():
            raise CheckpointError("model.pt: no such file")

        run_cli(main)
        """
    )
    assert result.returncode == 2
    assert result.stderr == "error: model.pt: no such file\n"
    assert result.stdout == ""


def test_run_cli_passes_success_and_interrupts():
    ok = run_python(
        """
        from guided_diffusion.script_util import run_cli
        run_cli(lambda: print("done"))
        """
    )
    assert ok.returncode == 0 and ok.stdout == "done\n" and ok.stderr == ""

    interrupted = run_python(
        """
        from guided_diffusion.script_util import run_cli

        def main():
            raise KeyboardInterrupt

        run_cli(main)
        """
    )
    assert interrupted.returncode == 130 and "Traceback" not in interrupted.stderr
