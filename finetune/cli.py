"""The `finetune` command line: parse → load config → call a recipe. No ML logic lives here.

Only ``finetune.config`` and ``finetune.errors`` are imported at module level; everything heavy is imported inside
the command that needs it, so ``finetune --help`` and config errors never import torch.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from finetune.config import ConfigError, dump_config, load_config
from finetune.errors import EXIT_USAGE, FinetuneError

app = typer.Typer(
    rich_markup_mode=None,
    help="Fine-tune FLUX.1 and FLUX.2 with LoRA, locally or on Replicate, and compare the versions you get.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(rich_markup_mode=None, help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[str, typer.Argument(help="YAML config file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. lora.rank=32 train.steps=500.", show_default=False)
]


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` as an error to stderr and return the Exit to raise."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@config_app.command("show")
def config_show(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Print the resolved config: every default written out, overrides applied."""
    typer.echo(dump_config(load_config(config, overrides or [])), nl=False)


@app.command()
def prepare(
    sources: Annotated[
        list[str],
        typer.Argument(help="Folders, zips, image files or datasets save_to_disk folders.", show_default=False),
    ],
    output: Annotated[str, typer.Option("-o", "--output", help="The dataset .zip to write.")],
    trigger_word: Annotated[
        str | None,
        typer.Option("--trigger-word", help="Rare token every caption will contain, e.g. TOK (optional for pairs)."),
    ] = None,
    max_side: Annotated[int, typer.Option("--max-side", help="Downscale so the long side is at most N px.")] = 2048,
    min_side: Annotated[int, typer.Option("--min-side", help="Skip images whose short side is below N px.")] = 256,
    background: Annotated[str, typer.Option("--background", help="Color transparent pixels land on.")] = "white",
    caption_template: Annotated[
        str | None,
        typer.Option(
            "--caption-template",
            help="Caption for images without one (default 'a photo of [trigger]'); for pairs, the instruction of "
            "pairs without one (default: drop them). [trigger] is replaced.",
        ),
    ] = None,
    near_dup_distance: Annotated[
        int | None,
        typer.Option("--near-dup-distance", help="Perceptual-hash bits for near duplicates (default 6; -1 disables)."),
    ] = None,
    autocaption: Annotated[
        str | None, typer.Option("--autocaption", help="transformers image-to-text model (folder or hub id).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Decoding processes (default: all cores).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help="Edit pairs: auto (detect), none (single images), start-end (NAME_start/NAME_end + NAME.txt), "
            "control (--control DIR), columns (--control-column).",
        ),
    ] = "auto",
    control: Annotated[
        list[str] | None,
        typer.Option("--control", help="Folder or zip of references with the targets' stems (repeat: ref 2, 3...)."),
    ] = None,
    image_column: Annotated[
        str | None, typer.Option("--image-column", help="Pairs dataset: the target Image column (default image).")
    ] = None,
    control_column: Annotated[
        list[str] | None,
        typer.Option("--control-column", help="Pairs dataset: a reference Image column (repeat: ref 2, 3...)."),
    ] = None,
    caption_column: Annotated[
        str | None, typer.Option("--caption-column", help="Pairs dataset: the instruction column (default text).")
    ] = None,
    masks: Annotated[
        str | None,
        typer.Option(
            "--masks",
            help="Folder or zip of grayscale loss masks named like the images (white = learn); stored as "
            "<stem>_mask.png. Images without one train whole.",
        ),
    ] = None,
) -> None:
    """Turn photos (or edit pairs) into a clean, captioned, deterministic dataset zip (plus OUT.report.json)."""
    from finetune.recipes.prepare import DEFAULT_NEAR_DUPLICATE_DISTANCE, format_summary
    from finetune.recipes.prepare import prepare as run_prepare

    if near_dup_distance is None:
        near_dup_distance = DEFAULT_NEAR_DUPLICATE_DISTANCE
    report = run_prepare(
        sources,
        output,
        trigger_word,
        max_side=max_side,
        min_side=min_side,
        background=background,
        caption_template=caption_template,
        near_duplicate_distance=None if near_dup_distance < 0 else near_dup_distance,
        autocaption=autocaption,
        workers=workers,
        progress=not no_progress,
        pairs=pairs,
        controls=control or [],
        image_column=image_column,
        control_columns=control_column or [],
        caption_column=caption_column,
        masks=masks,
    )
    typer.echo(format_summary(report))


BackendOpt = Annotated[str | None, typer.Option("--backend", help="local or replicate; overrides the config.")]


@app.command()
def train(
    config: ConfigArg,
    overrides: OverridesArg = None,
    backend: BackendOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest run of this config (or RUN_DIR given after it).")
    ] = False,
    allow_unmapped: Annotated[
        bool, typer.Option("--allow-unmapped", help="Remote: submit even though some settings cannot be honoured.")
    ] = False,
    detach: Annotated[
        bool, typer.Option("--detach", help="Remote: return right after the training is created.")
    ] = False,
    cancel_on_interrupt: Annotated[
        bool, typer.Option("--cancel-on-interrupt", help="Remote: Ctrl-C cancels the training instead of detaching.")
    ] = False,
    webhook: Annotated[
        str | None, typer.Option("--webhook", help="Remote: URL that receives training events.")
    ] = None,
) -> None:
    """Train a LoRA (locally with accelerate, or on Replicate) and register it as a new version."""
    overrides = list(overrides or [])
    run_dir = None
    # `--resume RUN_DIR`: a positional without '=' right after the flag is the run folder, not an override.
    if resume and overrides and "=" not in overrides[0]:
        run_dir = overrides.pop(0)
    if backend is not None:
        overrides.append(f"backend={backend}")
    cfg = load_config(config, overrides)
    if cfg.backend == "replicate":
        from finetune.recipes.train_remote import train_remote

        remote_version = train_remote(
            cfg,
            allow_unmapped=allow_unmapped,
            detach=detach,
            cancel_on_interrupt=cancel_on_interrupt,
            webhook=webhook,
        )
        if remote_version is not None:  # None: detached, the training id was printed
            typer.echo(remote_version.ref)
        return
    from finetune.recipes.train_local import train as train_local

    version = train_local(cfg, resume=run_dir or resume)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch` every process returns it: print it once
        typer.echo(version.ref)


def _number_list(option: str, value: str, kind: type) -> list:
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give comma-separated numbers, e.g. {option} 1,2,3") from None


@app.command("eval")
def eval_(
    refs: Annotated[
        list[str],
        typer.Argument(help="Versions: owner/name[:<id>], base, a .safetensors file, replicate:owner/name:<version>."),
    ],
    prompts_file: Annotated[
        str | None, typer.Option("--prompts", help="Prompt file: one per line, '#' comments; [trigger] replaced.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    inputs: Annotated[
        str | None,
        typer.Option(
            "--inputs",
            help="Edit LoRAs: a pair zip from `prepare`, a folder of NAME_start.png (+ NAME_end.png target) + "
            "NAME.txt, or of NAME.png + NAME.txt instructions. Each version edits every input; with "
            "--prompt/--prompts, every prompt is applied to every input instead of the instruction files.",
        ),
    ] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="Use this config's sample section.")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds, e.g. 1,2,3.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampling steps (default: the base model's).")] = None,
    size: Annotated[str | None, typer.Option("--size", help="1024 or WIDTHxHEIGHT, e.g. 768x1024.")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Guidance scale.")] = None,
    lora_scale: Annotated[str, typer.Option("--lora-scale", help="LoRA scale, or a sweep: 0.5,0.8,1.0.")] = "1.0",
    out: Annotated[str | None, typer.Option("--out", help="Report folder (default reports/<timestamp>).")] = None,
    allow_mixed_base: Annotated[
        bool, typer.Option("--allow-mixed-base", help="Sample LoRAs of another base anyway (warned in the report).")
    ] = False,
    clip_model: Annotated[str, typer.Option("--clip-model", help="CLIP scorer: hub id or folder.")] = (
        "openai/clip-vit-large-patch14"
    ),
    dino_model: Annotated[str, typer.Option("--dino-model", help="DINO scorer: hub id or folder.")] = (
        "facebook/dino-vits16"
    ),
    quantize: Annotated[
        str, typer.Option("--quantize", help="Base weights: int8, none, or auto (int8 on CUDA GPUs under 36 GiB).")
    ] = "auto",
) -> None:
    """Sample versions side by side on the same prompts and seeds, score them, and write a comparison report.

    With --inputs, the versions edit the same input images instead (FLUX.1 Kontext and FLUX.2 bases)."""
    cfg = load_config(config, []) if config else None
    seed_list = _number_list("--seeds", seeds, int) if seeds else (cfg.sample.seeds if cfg else [1, 2])
    scales = _number_list("--lora-scale", lora_scale, float)
    from finetune.recipes.evaluate import evaluate, read_prompt_file

    prompts: list[str] | None = None
    if prompts_file:
        prompts = read_prompt_file(prompts_file)
    if prompt:
        prompts = [*(prompts or []), *prompt]
    if prompts is None and cfg is not None and inputs is None:  # edits take the inputs' instructions, not the config's
        prompts = list(cfg.sample.prompts)
    if cfg is not None:  # the config's sample section fills what the command line left out (0 = model default)
        steps = steps if steps is not None else (cfg.sample.steps or None)
        guidance = guidance if guidance is not None else (cfg.sample.guidance or None)
        size = size if size is not None else (str(cfg.sample.size) if cfg.sample.size else None)
    result = evaluate(
        refs,
        prompts=prompts,
        inputs=inputs,
        seeds=seed_list,
        steps=steps,
        size=size,
        guidance=guidance,
        lora_scales=scales,
        out=out,
        allow_mixed_base=allow_mixed_base,
        clip_model=clip_model,
        dino_model=dino_model,
        base_model=cfg.base_model if cfg is not None and "base_model" in cfg.explicit else None,
        quantize=quantize,
    )
    typer.echo(f"Report: {result.html_path}")  # warnings and skipped metrics were logged as they happened


models_app = typer.Typer(
    rich_markup_mode=None,
    help="The local model registry: list, show, remove, import and export versions.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """List models with their version count and latest version."""
    from finetune.registry import Registry

    registry = Registry()
    models = registry.models()
    if not models:
        typer.echo(f"No models yet in {registry.root}. Train one with `finetune train CONFIG`.")
        return
    rows = [("MODEL", "VERSIONS", "LATEST", "CREATED", "BASE")]
    for model in models:
        versions = registry.versions(model)
        latest = versions[-1]
        rows.append(
            (
                model,
                str(len(versions)),
                latest.short_id,
                latest.info.get("created_at", ""),
                latest.lineage.get("base_model", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="owner/name or owner/name:<version id>.")]) -> None:
    """Show one version: its path, every version of the model, its model.json, and which tools load which form."""
    import json

    from finetune import lora
    from finetune.registry import Registry

    registry = Registry()
    version = registry.resolve(ref)
    typer.echo(f"{version.ref}  {version.path}")
    for other in registry.versions(version.model):
        mark = "*" if other.id == version.id else " "
        typer.echo(f" {mark} {other.short_id}  {other.info.get('created_at', '')}  {other.lineage.get('backend', '')}")
    typer.echo(json.dumps(version.info, indent=2, sort_keys=True))
    try:
        from finetune.lora_export import lora_family
        from finetune.lora_formats import tool_lines

        tensors, metadata = lora.load_lora_file(version.lora_path)
        family = lora_family(tensors, metadata)
    except FinetuneError:
        return
    typer.echo(f"Loads in (write a form with `finetune models export {version.ref} --format FORM -o FILE`):")
    for line in tool_lines(family):
        typer.echo(line)


@models_app.command("rm")
def models_rm(
    ref: Annotated[str, typer.Argument(help="owner/name:<version id> removes one version; owner/name the model.")],
) -> None:
    """Remove a version (or a whole model). Asks nothing; a missing reference is an error."""
    from finetune.registry import Registry

    removed = Registry().remove(ref)
    typer.echo(f"Removed {ref if ':' not in ref else removed.ref}")


@models_app.command("export")
def models_export(
    ref: Annotated[str, typer.Argument(help="owner/name, owner/name:<version id>, or a .safetensors file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The .safetensors file to write.")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="comfyui: the file ComfyUI loads (FLUX.2: BFL diffusion_model.* keys, alpha baked in; FLUX.1: the "
            "kohya file); kohya: lora_unet_* keys with .alpha; diffusers: the stored file.",
        ),
    ] = "kohya",
) -> None:
    """Write a version's LoRA as a file for other tools (ComfyUI, kohya, diffusers), FLUX.1 or FLUX.2."""
    import warnings
    from pathlib import Path

    out = Path(output)
    if format_ not in ("comfyui", "kohya", "diffusers"):
        raise fail(f"--format {format_!r} is not known; use comfyui, kohya or diffusers")
    if ref.endswith(".safetensors") and Path(ref).is_file():
        source = Path(ref)
    else:
        from finetune.registry import Registry

        source = Registry().resolve(ref).lora_path
    if out.exists() and out.resolve() == source.resolve():
        raise fail(f"-o {out} is the source file itself; choose another output path")
    what = format_
    if format_ == "diffusers":
        import shutil

        from finetune.files import atomic_file
        from finetune.lora_export import file_settings

        rank, alpha = file_settings(source)  # also checks the keys are a diffusers LoRA
        with open(source, "rb") as src, atomic_file(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        written = out
    else:
        from finetune import lora_export

        # one BFL module in memory at a time; the family from the names, the base model only where both fit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written, family, rank, alpha = lora_export.stream_export(source, out, form=format_)
        for warning in caught:
            typer.secho(f"Warning: {warning.message}", err=True, fg=typer.colors.YELLOW)
        what = f"{format_}, {'FLUX.2' if family == 'flux2' else 'FLUX.1'}"
    typer.echo(f"Wrote {written} ({what}, rank {rank}, alpha {alpha:g})")


@models_app.command("import")
def models_import(
    source: Annotated[
        str, typer.Argument(help="A LoRA .safetensors file, an https:// URL, or hf://owner/repo/file.safetensors.")
    ],
    as_: Annotated[str, typer.Option("--as", help="Register it as this model: owner/name.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The base model it was trained on (hub id, folder or preset:NAME); default: "
            "the file's finetune.base_model, else found from its keys and shapes.",
        ),
    ] = None,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Import the keys that fit and record the others in the lineage "
            "(default: any key that does not fit is an error and nothing is registered).",
        ),
    ] = False,
) -> None:
    """Import a FLUX LoRA in any common form (diffusers/peft, kohya, BFL/ai-toolkit, musubi, OneTrainer, DiffSynth,
    fal) as a new version, converted to finetune's own file."""
    from finetune.lora_import import import_lora

    version, plan = import_lora(source, as_, base_model=base, allow_partial=allow_partial)
    typer.echo(
        f"Imported {version.ref} ({plan.format}, {plan.layout.label}, {len(plan.modules)} modules, rank {plan.rank}, "
        f"alpha {plan.alpha:g}, base {version.lineage.get('base_model')})"
    )
    if plan.skipped:
        typer.secho(
            f"Warning: skipped {len(plan.skipped)} key(s) (recorded in the lineage): "
            + ", ".join(list(plan.skipped)[:10])
            + (" …" if len(plan.skipped) > 10 else ""),
            err=True,
            fg=typer.colors.YELLOW,
        )


# ---- trainings on Replicate (remote backend) ------------------------------------------------------------------

trainings_app = typer.Typer(
    rich_markup_mode=None,
    help="Trainings on Replicate: list, show, attach (follow + import), cancel.",
    no_args_is_help=True,
)
app.add_typer(trainings_app, name="trainings")
TrainingIdArg = Annotated[str, typer.Argument(help="Replicate training id.", show_default=False)]


@trainings_app.command("list")
def trainings_list(
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show at most this many (newest first).")] = 20,
) -> None:
    """List the account's trainings, newest first (web- and API-created)."""
    from finetune.replicate import Replicate

    with Replicate() as client:
        rows = [("ID", "STATUS", "TRAINER", "CREATED", "VERSION")]
        for t in client.list_trainings(limit=limit):
            rows.append(
                (
                    t.get("id", ""),
                    t.get("status") or "",
                    t.get("model") or "",
                    (t.get("created_at") or "")[:19],
                    ((t.get("output") or {}).get("version") or ""),
                )
            )
    if len(rows) == 1:
        typer.echo("No trainings on this account.")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@trainings_app.command("show")
def trainings_show(
    training_id: TrainingIdArg,
    logs: Annotated[int, typer.Option("--logs", help="Print the last N log lines.")] = 20,
) -> None:
    """Show one training: status, trainer, timings, output, error and the last log lines."""
    import json

    from finetune.replicate import Replicate

    with Replicate() as client:
        t = client.get_training(training_id)
    summary = {k: t.get(k) for k in ("id", "status", "model", "version", "created_at", "started_at", "completed_at")}
    summary.update(output=t.get("output"), error=t.get("error"), metrics=t.get("metrics"))
    typer.echo(json.dumps(summary, indent=2))
    lines = [ln for ln in (t.get("logs") or "").replace("\r", "\n").splitlines() if ln.strip()]
    if lines and logs:
        typer.echo("logs:")
        for ln in lines[-logs:]:
            typer.echo(f"  {ln}")


@trainings_app.command("attach")
def trainings_attach(
    training_id: TrainingIdArg,
    model: Annotated[
        str | None, typer.Option("--model", help="Registry model for the import; default: the run's or destination.")
    ] = None,
    cancel_on_interrupt: Annotated[
        bool, typer.Option("--cancel-on-interrupt", help="Ctrl-C cancels the training instead of detaching.")
    ] = False,
) -> None:
    """Follow a training (any of the account's) and import its LoRA as a version once it succeeds."""
    from finetune.recipes.train_remote import attach

    version = attach(training_id, model=model, cancel_on_interrupt=cancel_on_interrupt)
    typer.echo(version.ref)


@trainings_app.command("cancel")
def trainings_cancel(training_id: TrainingIdArg) -> None:
    """Cancel a training (safe to repeat)."""
    from finetune.replicate import Replicate

    with Replicate() as client:
        t = client.cancel_training(training_id)
    typer.echo(f"{training_id}: {t.get('status')}")


# ---- webhook receiver (automation) -----------------------------------------------------------------------------

webhooks_app = typer.Typer(
    rich_markup_mode=None, help="Receive Replicate webhooks: verify, record, import.", no_args_is_help=True
)
app.add_typer(webhooks_app, name="webhooks")


@webhooks_app.command("serve")
def webhooks_serve(
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8787,
    secret_env: Annotated[
        str, typer.Option("--secret-env", help="Environment variable holding the whsec_... signing secret.")
    ] = "REPLICATE_WEBHOOK_SECRET",
    host: Annotated[str, typer.Option("--host", help="Interface; loopback by default (put a proxy in front).")] = (
        "127.0.0.1"
    ),
    runs: Annotated[str, typer.Option("--runs", help="Folder holding the run folders.")] = "runs",
) -> None:
    """Verify each delivery's signature, drop replays, record training events into their run folder, and import the
    version once when a training succeeds."""
    import os
    from pathlib import Path

    from finetune.recipes.train_remote import attach
    from finetune.webhooks import WebhookReceiver

    secret = os.environ.get(secret_env, "").strip()
    if not secret:
        raise fail(
            f"{secret_env} is not set. Put your account's signing secret in it (GET /v1/webhooks/default/secret, "
            "or replicate.com/account/webhook), e.g. export REPLICATE_WEBHOOK_SECRET=whsec_..."
        )
    root = Path(runs)
    receiver = WebhookReceiver(
        secret, runs_root=root, host=host, port=port, on_succeeded=lambda tid: attach(tid, runs_root=root)
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"Warning: listening on {host}, not loopback; only signed deliveries are accepted.", err=True)
    typer.echo(f"Listening on {receiver.url} (Ctrl-C stops); events go to {root}/<run>/events.jsonl")
    receiver.serve()


@app.command("env")
def env_(
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON, for scripts.")] = False,
) -> None:
    """What this machine has (versions, GPUs, disk, logins, extras) and which FLUX models train on it; loads no model.
    Paste its output into bug reports."""
    import json

    from finetune import env

    info = env.collect()
    lines = env.plan(info["gpus"], env.transformer_sizes())
    if json_:
        typer.echo(json.dumps({**info, "plan": lines}, indent=2))
    else:
        typer.echo(env.format_report(info, lines), nl=False)


@app.command()
def demo(
    out: Annotated[str, typer.Option("--out", help="Folder for the images, dataset, run and report.")] = "demo",
    size: Annotated[str, typer.Option("--size", help="tiny (default, under 3 min on 2 CPU cores) or small.")] = "tiny",
) -> None:
    """Run the whole job on the CPU with a random-weight model: images → prepare → train → register → eval."""
    if size not in ("tiny", "small"):
        raise fail(f"--size {size!r} must be 'tiny' or 'small'")
    from finetune.demo import run_demo

    run_demo(out, size=size)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps user errors to a clear message and a meaningful exit code."""
    try:
        app(args=argv, prog_name="finetune")
    except ConfigError as e:
        typer.secho(f"Error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(EXIT_USAGE)
    except FinetuneError as e:
        typer.secho(f"Error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.secho("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
