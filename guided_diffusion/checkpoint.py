"""Checkpoint files shared by all trainers: one self-describing file per save.

A checkpoint is a dict of plain Python types and tensors only, so it loads with
``torch.load(..., weights_only=True)``::

    {"format": "addpm-checkpoint", "version": 1, "kind": "diffusion" | "preseg" | "denoiser",
     "config": {...},          # plain types: rebuilds the network and its preprocessing
     "model": state_dict, "ema": {rate: state_dict} | None, "optimizer": state_dict | None,
     "step": int, "extra": {...}}

Saves are atomic: a local file is written to a temp file in the destination folder and
renamed over the target, so a crash or an error mid-save leaves the previous file intact.
Remote (blobfile) paths are serialized in memory first and uploaded as one object.

Resume reads the step from inside the file, not from its name (renaming saved files must not
silently drop the EMA and optimizer state).
"""

import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping

import blobfile as bf
import torch
import torch.nn as nn

from guided_diffusion.atomic import atomic_write
from guided_diffusion.errors import CheckpointError

FORMAT = "addpm-checkpoint"
# Every trainer ends its run with this file, holding the state at the run's end step.
FINAL_NAME = "final.pt"
FORMAT_VERSION = 1
KINDS = ("diffusion", "preseg", "denoiser")

# How many key names a mismatch message lists per category before "...".
_SHOWN_KEYS = 3

_NOT_READABLE = "not a readable torch file (truncated, corrupt, or not written by torch.save)"
# Phrases of torch.load's RuntimeErrors for damaged or non-torch files.
_CORRUPT_SIGNS = ("PytorchStreamReader", "zip archive", "magic number", "EOF", "corrupt", "Invalid")


def _is_remote(path: str) -> bool:
    return "://" in path


def _check_plain(value, where: str) -> None:
    """Raise TypeError unless ``value`` is built from plain types (what a config may hold)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} holds a {type(value).__name__}; a checkpoint config holds plain types only")


def save_checkpoint(
    path,
    *,
    kind: str,
    model_state: Mapping,
    config: dict,
    ema: dict | None = None,
    optimizer: dict | None = None,
    step: int = 0,
    extra: dict | None = None,
) -> None:
    """Write one checkpoint atomically.

    :param path: local path or blobfile URL; missing folders are created.
    :param kind: one of ``KINDS``.
    :param model_state: the network's state dict (``unwrap_model(model).state_dict()``).
    :param config: plain types only (TypeError otherwise): what rebuilds the network and its
        preprocessing.
    :param ema: ``{rate string: state dict}``, one per EMA rate, or None.
    :param optimizer: ``optimizer.state_dict()`` or None.
    :param step: number of optimizer steps taken; resume starts from it.
    :param extra: any further plain values and tensors (e.g. the grad scaler's state).
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(model_state, Mapping):
        raise TypeError(f"model_state must be a state dict, got {type(model_state).__name__}")
    _check_plain(config, "config")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "model": model_state,
        "ema": None if ema is None else {str(rate): state for rate, state in ema.items()},
        "optimizer": optimizer,
        "step": int(step),
        "extra": dict(extra or {}),
    }
    path = os.fspath(path)
    if _is_remote(path):
        # Object stores commit an upload as a whole, so serializing first (a pickling error
        # raises before anything is written) and writing once is atomic there.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        folder = bf.dirname(path)
        if folder:
            bf.makedirs(folder)
        bf.write_bytes(path, buffer.getvalue())
        return
    # atomic_write's temporary name starts with a dot, which keeps it out of the "*.pt"
    # listing of run_dir.list_checkpoints.
    atomic_write(path, lambda tmp: torch.save(payload, tmp), durable=True)


def _load(path: str, map_location="cpu", mmap: bool = False):
    """``torch.load(weights_only=True)`` with every failure turned into a one-line CheckpointError."""
    if not bf.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if bf.isdir(path):
        raise CheckpointError(f"{path} is a folder, expected a checkpoint file")
    try:
        with warnings.catch_warnings():
            # A plain pickle trips a protocol warning before the error below says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if _is_remote(path):
                with bf.BlobFile(path, "rb") as f:
                    source = io.BytesIO(f.read())
                return torch.load(source, map_location=map_location, weights_only=True)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"{path}: {_NOT_READABLE}") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if not found:
            # A pickle of Python objects and random bytes fail alike here: name both.
            raise CheckpointError(
                f"{path}: the safe loader (torch.load weights_only=True) cannot read it: a pickle "
                f"of Python objects, or not a torch file at all"
            ) from None
        raise CheckpointError(
            f"{path}: not a checkpoint of this code: it holds a Python object of type "
            f"{found.group(1)}, which the safe loader "
            f"(torch.load weights_only=True) refuses; only tensors and plain types are accepted"
        ) from None
    except RuntimeError as err:
        text = str(err).strip()
        if any(sign in text for sign in _CORRUPT_SIGNS):
            raise CheckpointError(f"{path}: {_NOT_READABLE}") from None
        # Not a sign of a bad file (e.g. a CUDA map_location without CUDA): keep the reason.
        reason = text.split("\n", 1)[0][:160]
        raise CheckpointError(f"{path}: could not be loaded: {reason}") from None
    except (EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError):
        raise CheckpointError(f"{path}: {_NOT_READABLE}") from None


def is_raw_state_dict(obj) -> bool:
    """True for a plain ``{name: tensor}`` dict, as improved-diffusion-style code saves."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and obj.get("format") != FORMAT
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_raw_object(path, map_location="cpu"):
    """Whatever a torch file holds, loaded with weights_only=True; errors as CheckpointError."""
    return _load(os.fspath(path), map_location=map_location)


def load_checkpoint(path, kind: str | None = None, map_location="cpu") -> dict:
    """Load and check one of our checkpoints.

    :param kind: the expected kind (one of ``KINDS``) or None for any.
    :return: dict with keys format, version, kind, config, model, ema, optimizer, step, extra.
    :raises CheckpointError: (one line naming the file) when the file is missing, is not a
        torch file or is corrupt, holds objects the safe loader refuses, is a torch file that
        is not ours (e.g. a raw state dict), has another kind, or a newer format version.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    path = os.fspath(path)
    obj = _load(path, map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        if is_raw_state_dict(obj):
            raise CheckpointError(
                f"{path}: not an ADDPM checkpoint; it looks like a raw state dict; pass the "
                f"model flags to load it as such"
            )
        raise CheckpointError(
            f"{path}: a torch file but not an ADDPM checkpoint (no '{FORMAT}' header; it holds "
            f"a {type(obj).__name__})"
        )
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: checkpoint without a valid format version ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this code reads "
            f"(up to {FORMAT_VERSION}); update the code"
        )
    found_kind = obj.get("kind")
    if kind is not None and found_kind != kind:
        raise CheckpointError(f"{path} is a {found_kind} checkpoint, expected a {kind} checkpoint")
    if not isinstance(obj.get("model"), Mapping) or not isinstance(obj.get("config"), dict):
        raise CheckpointError(f"{path}: incomplete checkpoint (no model weights or no config)")
    for key, default in (("ema", None), ("optimizer", None), ("step", 0), ("extra", {})):
        obj.setdefault(key, default)
    return obj


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _strip_wrapper_prefix(state_dict: Mapping) -> Mapping:
    # A state dict saved from a DDP or compiled wrapper has every key prefixed; the names
    # below the prefix are the network's own, so strict matching still applies to them.
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _examples(keys: list) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def load_weights(module: nn.Module, state_dict: Mapping, source: str) -> None:
    """Load ``state_dict`` into ``module`` strictly, or raise a one-line CheckpointError.

    :param source: the file the weights came from (named in the message).
    The message names the first few missing, unexpected and shape-mismatched keys: such a
    mismatch almost always means the model was built with other flags than in training.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict of tensors, found a {type(state_dict).__name__}"
        )
    module = unwrap_model(module)
    state_dict = _strip_wrapper_prefix(state_dict)
    own = module.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state_dict
        and isinstance(state_dict[key], torch.Tensor)
        and state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape, file vs model ({_examples(mismatched)})")
        raise CheckpointError(
            f"{source}: the weights do not fit the model: {'; '.join(parts)}; were the model "
            f"flags (e.g. --num_channels, --channel_mult, --attention_resolutions, "
            f"--learn_sigma, --image_size) different when it was trained?"
        )
    module.load_state_dict(state_dict, strict=True)


def checkpoint_step(path, kind: str | None = None) -> int | None:
    """The step stored in our checkpoint ``path`` (of ``kind``, when given); None for a file
    that is missing, unreadable or not ours. Reads the step only (mmap: no weights loaded)."""
    path = os.fspath(path)
    if not bf.exists(path) or bf.isdir(path):
        return None
    try:
        obj = _load(path, mmap=not _is_remote(path) and _is_zip(path))
    except CheckpointError:
        return None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    if kind is not None and obj.get("kind") != kind:
        return None
    step = obj.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def file_sha256(path) -> str:
    """SHA-256 of a file, read through blobfile as the checkpoint loaders read it, so a cloud
    URL is hashed as it loads."""
    digest = hashlib.sha256()
    try:
        with bf.BlobFile(os.fspath(path), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (OSError, bf.Error) as err:
        raise CheckpointError(f"{path}: cannot read it to record its SHA-256 ({err})") from None
    return digest.hexdigest()


def _is_zip(path: str) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False
