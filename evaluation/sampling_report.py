"""The header and the closing line of a ``sample.py`` run (formatted by
``guided_diffusion.run_report``, as the trainers' and ``python -m evaluation``'s)."""

from guided_diffusion import run_report

TITLE = "sampling"


def describe_sampler(plan, num_members: int, fusion: str) -> str:
    """``addpm 300 -> 250 (50 UNet evaluations per member, final step denoiser); 5 members, fusion mean``."""
    if plan.sampler == "preseg":
        return "preseg: the pre-segmentation alone"
    text = plan.sampler
    if plan.sampler == "addpm":
        text += f" {plan.timesteps[0]} -> {plan.timesteps[-1]}"
    text += f" ({plan.unet_evaluations} UNet evaluations per member"
    text += f", final step {plan.final_step})" if plan.sampler == "addpm" else ")"
    return text + f"; {num_members} member{'s' if num_members != 1 else ''}, fusion {fusion}"


def describe_data(dataset, data_dir: str, n_selected: int, n_todo: int) -> str:
    """``DATA: 16 cases (brats2d), labelled`` or ``..., unlabelled: masks, uncertainty and
    overlays are written, no metrics``."""
    what = dataset.layout + (" layout of the model" if dataset.unlabelled_input else "")
    text = f"{data_dir}: {n_selected} case{'s' if n_selected != 1 else ''} ({what})"
    if dataset.labelled:
        text += ", labelled"
    elif dataset.n_labelled:
        unit = "volumes" if dataset.kind == "volume" else "cases"
        text += f", {dataset.n_labelled} of {len(dataset.records)} {unit} with a label (the others are not scored)"
    else:
        text += ", unlabelled: masks, uncertainty and overlays are written, no metrics"
    if n_todo < n_selected:
        text += f"; {n_selected - n_todo} already done here"
    return text


def sampling_header(*, options, data_dir: str, plan, dataset, ctx, num_members: int, n_selected: int,
                    n_todo: int, checkpoints: dict, overlay_channel: int) -> str:
    """The block sample.py prints before its first case; ``options``: its ``OutputOptions``."""
    paths = ", ".join(f"{flag.replace('_path', '')} {entry['path']}" for flag, entry in checkpoints.items())
    overlays = (f"channel {overlay_channel} ({dataset.channel_names[overlay_channel]})"
                if options.save_overlays else "off")
    return run_report.header(TITLE, [
        ("device", f"{ctx.device}, {options.precision}, {run_report.processes(ctx.world_size)}"),
        ("sampler", describe_sampler(plan, num_members, options.fusion)),
        ("data", describe_data(dataset, data_dir, n_selected, n_todo)),
        ("checkpoints", paths),
        ("overlays", overlays),
        ("out_dir", options.out_dir),
    ])


def sampling_closing(summary: dict, out_dir: str, seconds: float, *, save_overlays: bool) -> str:
    """``sampling done in 28 s: mean dice ...; 1.77 s per image; results in OUT (metrics.csv, ...)``."""
    written = (["metrics.csv"] if summary.get("n_cases") else []) + ["summary.json", "masks/", "uncertainty/"]
    written += ["overlays/"] if save_overlays else []
    per_image = summary.get("seconds_per_image")
    return run_report.closing(TITLE, [
        summary["results"],
        f"{per_image:.3g} s per image" if per_image is not None else "",
        f"results in {out_dir} ({', '.join(written)})",
    ], seconds)
