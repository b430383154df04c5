"""Checkpoint files: round trip, atomic saves, and one clear error line for every bad file."""

import os
import pickle

import pytest
import torch
import torch.nn as nn

from guided_diffusion.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    is_raw_state_dict,
    load_checkpoint,
    load_raw_object,
    load_weights,
    save_checkpoint,
    unwrap_model,
)
from guided_diffusion.errors import CheckpointError
from guided_diffusion.run_dir import list_checkpoints, newest_checkpoint
from guided_diffusion.script_util import create_model, unet_defaults

TINY_UNET = dict(
    unet_defaults(),
    image_size=16,
    image_channels=2,
    num_channels=8,
    num_res_blocks=1,
    attention_resolutions="8",
    channel_mult="1,2",
    num_heads=2,
)


class NotOurs:
    """A class the safe loader does not know: stands for any foreign pickle."""

    def __init__(self):
        self.payload = [1, 2, 3]


def tiny_unet(**overrides):
    return create_model(**{**TINY_UNET, **overrides})


def tiny_conv():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))


def one_train_step(model, optimizer):
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 5])
    loss = model(x, t).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_state_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def assert_one_line_naming(err, path):
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def save_tiny(path, *, kind="diffusion", step=0, model=None):
    model = model or tiny_unet()
    save_checkpoint(path, kind=kind, model_state=model.state_dict(), config={"model": TINY_UNET}, step=step)
    return model


def test_round_trip_is_bit_identical_with_ema_and_optimizer(tmp_path):
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    one_train_step(model, optimizer)
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path / "run" / "diffusion_0000007.pt"
    save_checkpoint(
        path,
        kind="diffusion",
        model_state=model.state_dict(),
        config={"model": TINY_UNET, "preprocess": {"image_size": 16, "clip": (0.5, 99.5)}},
        ema={"0.9999": ema},
        optimizer=optimizer.state_dict(),
        step=7,
        extra={"scaler": {"scale": 1024.0}},
    )
    # Only tensors and plain types inside: the safe loader reads it as it is.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == FORMAT_VERSION

    ckpt = load_checkpoint(path, kind="diffusion")
    assert ckpt["step"] == 7 and ckpt["kind"] == "diffusion"
    assert ckpt["config"]["model"] == TINY_UNET
    assert ckpt["extra"] == {"scaler": {"scale": 1024.0}}

    rebuilt = create_model(**ckpt["config"]["model"])
    load_weights(rebuilt, ckpt["model"], source=str(path))
    rebuilt_opt = torch.optim.AdamW(rebuilt.parameters(), lr=1e-3)
    rebuilt_opt.load_state_dict(ckpt["optimizer"])
    assert_state_equal(rebuilt_opt.state_dict(), optimizer.state_dict())
    assert_state_equal(ckpt["ema"]["0.9999"], ema)

    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0, 9])
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), rebuilt(x, t))
    # The optimizer state continues identically too.
    torch.manual_seed(1)
    one_train_step(model, optimizer)
    torch.manual_seed(1)
    one_train_step(rebuilt, rebuilt_opt)
    assert_state_equal(model.state_dict(), rebuilt.state_dict())


def test_conv_stack_round_trip_and_wrapper_unwrapping(tmp_path):
    net = tiny_conv()
    path = tmp_path / "preseg.pt"
    save_checkpoint(path, kind="preseg", model_state=net.state_dict(), config={"arch": "conv"})
    other = tiny_conv()
    # Saved from a wrapper with "module." prefixes, loaded into the plain network.
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    load_weights(other, prefixed, source="wrapped.pt")
    ckpt = load_checkpoint(path, kind="preseg")
    load_weights(nn.DataParallel(other), ckpt["model"], source=str(path))
    assert unwrap_model(nn.DataParallel(other)) is other
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(net(x), other(x))


def test_atomic_save_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "diffusion_0000001.pt"
    model = save_tiny(path, step=1)
    save_tiny(path, step=2, model=model)
    assert sorted(os.listdir(tmp_path)) == ["diffusion_0000001.pt"]
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(
            path,
            kind="diffusion",
            model_state=model.state_dict(),
            config={},
            extra={"bad": Unpicklable()},
            step=3,
        )
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["diffusion_0000001.pt"]
    assert load_checkpoint(path)["step"] == 2


def test_config_must_hold_plain_types(tmp_path):
    with pytest.raises(TypeError, match="plain types"):
        save_checkpoint(tmp_path / "x.pt", kind="denoiser", model_state={}, config={"t": torch.ones(1)})
    assert not (tmp_path / "x.pt").exists()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "no such file" in assert_one_line_naming(err, path)


def test_truncated_file(tmp_path):
    path = tmp_path / "model.pt"
    save_tiny(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "corrupt" in assert_one_line_naming(err, path)


def test_text_and_empty_files(tmp_path):
    for name, data in (("empty.pt", b""), ("notes.pt", b"hello, this is text\n")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert_one_line_naming(err, path)


def test_foreign_pickle(tmp_path):
    for name, save in (
        ("pickled.pt", lambda p: p.write_bytes(pickle.dumps(NotOurs()))),
        ("torch_saved.pt", lambda p: torch.save({"obj": NotOurs()}, p)),
    ):
        path = tmp_path / name
        save(path)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = assert_one_line_naming(err, path)
        assert "weights_only" in message
        with pytest.raises(CheckpointError):
            load_raw_object(path)


def test_raw_state_dict_is_recognised(tmp_path):
    path = tmp_path / "savedmodel.pt"
    model = tiny_unet()
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "raw state dict" in assert_one_line_naming(err, path)
    obj = load_raw_object(path)
    assert is_raw_state_dict(obj)
    assert not is_raw_state_dict({"format": FORMAT})
    assert not is_raw_state_dict({})
    other = tiny_unet()
    load_weights(other, obj, source=str(path))
    assert_state_equal(other.state_dict(), model.state_dict())


def test_other_torch_object_is_not_ours(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "not an ADDPM checkpoint" in assert_one_line_naming(err, path)


def test_wrong_kind(tmp_path):
    path = tmp_path / "preseg.pt"
    save_tiny(path, kind="preseg")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, kind="diffusion")
    message = assert_one_line_naming(err, path)
    assert message == f"{path} is a preseg checkpoint, expected a diffusion checkpoint"


def test_newer_version(tmp_path):
    path = tmp_path / "future.pt"
    save_tiny(path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "newer" in assert_one_line_naming(err, path)


def test_checkpoint_of_other_flags(tmp_path):
    path = tmp_path / "wide.pt"
    save_tiny(path, model=tiny_unet(num_channels=16))
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_unet(), ckpt["model"], source=str(path))
    message = assert_one_line_naming(err, path)
    assert "of another shape" in message and "flags" in message

    save_tiny(path, model=tiny_unet(learn_sigma=True, attention_resolutions=""))
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_unet(), load_checkpoint(path)["model"], source=str(path))
    message = assert_one_line_naming(err, path)
    assert "missing" in message and "input_blocks" in message


def test_newest_checkpoint_reads_the_step_from_the_content(tmp_path):
    assert newest_checkpoint(tmp_path / "absent") is None
    assert newest_checkpoint(tmp_path) is None
    model = tiny_unet()
    # The names lie about the order: the content decides.
    save_tiny(tmp_path / "diffusion_0000900.pt", step=100, model=model)
    save_tiny(tmp_path / "renamed.pt", step=300, model=model)
    save_tiny(tmp_path / "latest.pt", step=200, model=model)
    save_tiny(tmp_path / "preseg_0009999.pt", kind="preseg", step=9999, model=model)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    (tmp_path / "notes.txt").write_text("ignored")

    assert newest_checkpoint(tmp_path) == str(tmp_path / "preseg_0009999.pt")
    assert newest_checkpoint(tmp_path, kind="diffusion") == str(tmp_path / "renamed.pt")
    steps = [step for step, _ in list_checkpoints(tmp_path, kind="diffusion")]
    assert steps == [100, 200, 300]
