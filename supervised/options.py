"""The supervised training engine's options: one dataclass, its flag defaults and help strings.

``train_preseg_network.py`` and ``train_denoising_network.py`` expose these as flags (the same
names); ``TrainOptions.from_args`` picks them from the parsed flags and ``check`` refuses a
value the engine cannot use, with one line naming the flag.
"""

import dataclasses
from dataclasses import dataclass

from guided_diffusion.dist_util import PRECISIONS
from guided_diffusion.errors import ConfigError
from guided_diffusion.run_dir import check_resume_flags
from guided_diffusion.script_util import HELP

LR_SCHEDULES = ("cosine", "plateau")


@dataclass
class TrainOptions:
    """Every knob of the engine; the flags of the same names (see ``ENGINE_HELP``)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 12
    max_steps: int = 0
    max_epoch: int = 100
    lr_schedule: str = "cosine"
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    grad_clip: float = 1.0
    val_interval: int = 0
    save_interval: int = 1000
    keep_checkpoints: int = 3
    log_interval: int = 10
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    out_dir: str = ""
    resume: str = ""
    resume_checkpoint: str = ""

    @classmethod
    def from_args(cls, args):
        """Pick the engine's options from parsed flags (a Namespace or a dict)."""
        source = args if isinstance(args, dict) else vars(args)
        return cls(**{f.name: source[f.name] for f in dataclasses.fields(cls) if f.name in source})

    def check(self):
        """Raise ConfigError (one line naming the flag) for a value the engine cannot use."""
        positive = {"lr": self.lr, "batch_size": self.batch_size, "log_interval": self.log_interval}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name} must be positive, got {value}")
        non_negative = {
            "weight_decay": self.weight_decay, "max_steps": self.max_steps,
            "max_epoch": self.max_epoch, "ce_weight": self.ce_weight,
            "dice_weight": self.dice_weight, "grad_clip": self.grad_clip,
            "val_interval": self.val_interval, "save_interval": self.save_interval,
            "keep_checkpoints": self.keep_checkpoints, "num_workers": self.num_workers,
            "plateau_patience": self.plateau_patience,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"--{name} must be >= 0, got {value}")
        if self.ce_weight + self.dice_weight <= 0:
            raise ConfigError("--ce_weight and --dice_weight are both 0: there is no loss to train on")
        if self.max_steps == 0 and self.max_epoch == 0:
            raise ConfigError("--max_steps and --max_epoch are both 0: set one to bound the run")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"--plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"--lr_schedule: unknown value {self.lr_schedule!r} (choose one of {', '.join(LR_SCHEDULES)})"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision: unknown value {self.precision!r} (choose one of {', '.join(PRECISIONS)})"
            )
        check_resume_flags(self.resume, self.resume_checkpoint)


def engine_defaults():
    """Flag defaults of the engine (``--num_workers`` is a data flag: ``data.data_defaults``)."""
    return {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.name != "num_workers"}


ENGINE_HELP = {
    "lr": "learning rate (AdamW); the peak of the cosine schedule",
    "weight_decay": HELP["weight_decay"],
    "batch_size": HELP["batch_size"],
    "max_steps": "stop after this many optimizer steps; 0 = no limit (the first of --max_steps and --max_epoch reached ends the run)",
    "max_epoch": "stop after this many passes over the training items; 0 = no limit",
    "lr_schedule": (
        "cosine: decay the lr from --lr to 0 over the run (--max_steps / --max_epoch); plateau: "
        "multiply it by --plateau_factor when the validation Dice has not improved for "
        "--plateau_patience validations"
    ),
    "plateau_patience": "with --lr_schedule plateau: validations without improvement before the lr drops",
    "plateau_factor": "with --lr_schedule plateau: factor applied to the lr when it drops",
    "ce_weight": "weight of the cross-entropy term of the loss",
    "dice_weight": "weight of the soft Dice term (1 - Dice of the foreground) of the loss",
    "grad_clip": HELP["grad_clip"],
    "val_interval": "validate every this many steps; 0 = at the end of every epoch",
    "save_interval": (
        "save <kind>_<step>.pt every this many steps (0 = only final.pt); best.pt is saved at "
        "every validation that improves the Dice"
    ),
    "keep_checkpoints": "how many of the newest <kind>_<step>.pt files to keep; 0 = keep all",
    "log_interval": HELP["log_interval"],
    "precision": HELP["precision"],
    "device": HELP["device"],
    "seed": HELP["seed"],
    "out_dir": (
        "folder (or blobfile URL) for checkpoints and logs; empty = $OPENAI_LOGDIR/preseg or "
        "$OPENAI_LOGDIR/denoiser, else ./runs/preseg or ./runs/denoiser (where sample.py looks "
        "for best.pt by default)"
    ),
    "resume": "auto: resume from the newest checkpoint in --out_dir if there is one; empty: start fresh",
    "resume_checkpoint": (
        "checkpoint to resume from (weights, optimizer, lr schedule, step, RNG); 'auto' = as "
        "--resume auto; empty = start fresh"
    ),
}
