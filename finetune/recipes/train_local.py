"""The local trainer: setup → cache → loop → checkpoint → register, top to bottom, written for accelerate.

``train(cfg)`` checks the config, dataset and optimizer before any model loads; caches VAE latent distributions and
text embeddings once (content-keyed, shared by all runs); trains a peft LoRA on the FLUX transformer with flow
matching (DESIGN.md); checkpoints the full state atomically; renders samples and a fixed-σ validation loss; and
registers the LoRA as a new version with its lineage. A pair zip (edit LoRAs, FLUX.2) also caches each pair's
references at the target's bucket and feeds their normalized means to the transformer after the noisy tokens; the
loss covers the target. ``accelerate launch -m finetune train CONFIG`` runs it data-parallel: every global
micro-batch comes from one bucket and every sample's noise, σ and caption dropout are drawn from (seed, micro-batch
index, sample id), so the result does not depend on the number of processes; only the main process writes the
cache, checkpoints, samples and the registry entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import importlib.util
import io
import json
import logging
import netrc
import os
import resource
import time
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from finetune import cache, checkpoint, flow, fused_lora, lora, models, optim
from finetune.config import Config, config_to_dict, dump_config
from finetune.dataset import (
    BatchOrder,
    Dataset,
    Entry,
    Item,
    assign_buckets,
    load_bucket_image,
    read_dataset,
    read_datasets,
    sample_seed,
)
from finetune.errors import EXIT_FAILURE, EXIT_USAGE, FinetuneError
from finetune.registry import Registry, Version

__all__ = ["train"]

log = logging.getLogger("finetune.train")
LOG_EVERY = 10  # steps between host reads of the loss (one device sync per interval, not per step)
VAL_SIGMAS = (0.25, 0.5, 0.75)  # fixed-σ validation loss (ai-toolkit/kohya pattern, reference/local-trainers.md §9)
VAL_ITEMS = 4
# Settings a resumed run may change: where and how often things are written and logged, never what is trained.
RESUMABLE_CHANGES = (
    "train.save_every",
    "train.keep_checkpoints",
    "train.output_dir",
    "train.cache_dir",
    "train.wandb_project",
    "lora.save_dtype",
    "sample.",
)


def train(cfg: Config, *, resume: bool | str = False, registry: Registry | None = None) -> Version:
    """Train a LoRA for ``cfg`` locally and register it; ``resume`` (True or a run folder) continues a run."""
    t0 = time.perf_counter()
    # ---- setup: everything that can fail cheaply fails before a model loads -------------------------------------
    family = models.family_for(cfg.base_model)
    family.check_config(cfg)
    dropout = family.default_caption_dropout(cfg.base_model)
    if dropout is not None and "train.caption_dropout" not in cfg.explicit:  # recorded in the run's config
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, caption_dropout=dropout))
    dataset = read_datasets(cfg.dataset, cfg.trigger_word)
    references = max((len(item.references) for item in dataset.items), default=0)
    if references > family.MAX_REFERENCES:
        takes = (
            f"takes {family.MAX_REFERENCES} reference image(s) per edit"
            if family.MAX_REFERENCES
            else "trains no edits"
        )
        raise FinetuneError(
            f"dataset {dataset.path} holds edit pairs with {references} reference image(s) and base_model "
            f"{cfg.base_model} is {family.LABEL}, which {takes}: edit pairs train on FLUX.1 Kontext (one reference) "
            "or FLUX.2 [klein]/[dev] (up to 10)"
        )
    dataset, sample_prompts, sample_inputs = _sample_inputs(cfg, family, dataset)
    dataset, held_out = _held_out(cfg, dataset)  # train.validation: images the LoRA never trains on
    regularization = None
    if cfg.train.regularization.dataset:  # class images: their captions need no trigger word
        regularization = read_dataset(cfg.train.regularization.dataset, "")
        if any(item.references for item in regularization.items):
            raise FinetuneError(
                f"train.regularization.dataset: {regularization.path} is a pair zip; regularisation takes class "
                "images (a zip of single images from `finetune prepare`)",
                EXIT_USAGE,
            )
    cpu = models.resolve_device(cfg.train.device).type == "cpu"
    processes = PartialState(cpu=cpu)  # joins `accelerate launch` / torchrun process groups
    device, main = processes.device, processes.is_main_process
    optim.check_optimizer(cfg.train.optimizer, device)
    quantize = models.resolve_quantize(cfg.train.quantize, device, weights_gib=family.transformer_gib(cfg.base_model))
    # torch.compile cannot compile torchao's int8 tensors themselves (torch 2.13 + torchao 0.18), only the fused LoRA
    # node that takes their int8 values: so every block Linear must be one, with no dropout (peft's path).
    if quantize and cfg.train.compile and (cfg.lora.targets != "all-linear" or cfg.lora.dropout > 0):
        raise FinetuneError(
            f"train.compile: with int8 base weights (train.quantize={cfg.train.quantize} on {device}) it needs "
            f"lora.targets: all-linear and lora.dropout: 0 (got {cfg.lora.targets!r}, {cfg.lora.dropout:g}); change "
            "those, set train.compile=false, or train.quantize=none on a GPU with 40 GB or more"
        )
    # `accelerate launch --use_fsdp` (or ACCELERATE_USE_FSDP=true under torchrun) with several processes: FSDP2
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and processes.num_processes > 1
    if sharded:  # we shard (_shard); accelerate then runs as plain data-parallel and must not shard or wrap again
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    class_word = cfg.train.preservation.class_word.strip()
    if class_word and quantize and cfg.train.compile:
        raise FinetuneError(
            f"train.preservation.class_word: its base-model pass runs the int8 Linears without their LoRA, which "
            f"torch.compile cannot compile (train.quantize={cfg.train.quantize} on {device}); set "
            "train.compile=false or train.quantize=none",
            EXIT_USAGE,
        )
    if sharded and (quantize or cfg.train.compile):
        raise FinetuneError(
            "FSDP (accelerate launch --use_fsdp) shards bf16 base weights: set train.quantize=none and "
            "train.compile=false for it (int8 weights cannot be sharded as DTensors yet), or launch without FSDP",
        )
    if not 1 <= cfg.lora.rank <= 256:
        raise FinetuneError(f"lora.rank: {cfg.lora.rank} is out of range; use 1 to 256")
    if cfg.train.batch_size % processes.num_processes:
        raise FinetuneError(
            f"train.batch_size: {cfg.train.batch_size} images cannot be split evenly over "
            f"{processes.num_processes} processes; use a multiple of {processes.num_processes}"
        )
    registry = registry or Registry()
    run_dir, ckpt = _run_dir(cfg, resume)
    mixed = cfg.train.mixed_precision
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=("bf16" if device.type == "cuda" else "no") if mixed == "auto" else mixed,
        log_with=_trackers(cfg, run_dir, ckpt),
        project_dir=str(run_dir),
    )
    state = checkpoint.load_training_state(ckpt) if ckpt else None
    if state is not None:
        _check_resumable(cfg, state, dataset.digest, ckpt)
    dtype = models.resolve_dtype(cfg.train.dtype, device)
    seq_len = family.max_sequence_length(cfg.base_model, cfg.train.max_sequence_length)
    cache_dir = Path(cfg.train.cache_dir).expanduser() if cfg.train.cache_dir else cache.default_cache_dir()

    # ---- models: the VAE now, the text encoders only if the cache lacks a caption, the transformer after caching --
    c = family.load_components(cfg.base_model, dtype=dtype, device=device, parts=("vae",))
    vae_scale = family.vae_scale_factor(c.vae)
    prompts = [p.replace("[trigger]", cfg.trigger_word) for p in sample_prompts]
    # train.preservation: each caption with the trigger word replaced by the class word, cached like every caption
    class_captions = {i.caption: i.caption.replace(cfg.trigger_word, class_word) for i in dataset.items if class_word}

    # ---- cache: built once by the main process, keyed by content and settings, read by every process ------------
    t_cache = time.perf_counter()
    vae_id = cache.source_identity(cfg.base_model, ["vae"])
    tokenizers = [p.replace("text_encoder", "tokenizer") for p in family.TEXT_PARTS]  # diffusers names them so
    text_id = cache.source_identity(cfg.base_model, [*family.TEXT_PARTS, *tokenizers])
    plan = functools.partial(_Examples.plan, cfg=cfg, vae_id=vae_id, dtype=dtype, multiple=2 * vae_scale)
    train_ex = plan(dataset, dataset.items, repeats=True)
    val_ex = plan(held_out, held_out.items) if held_out is not None else None
    reg_ex = plan(regularization, regularization.items) if regularization is not None else None
    examples = [ex for ex in (train_ex, val_ex, reg_ex) if ex is not None]
    images = list({image[0]: image for ex in examples for image in ex.images}.values())  # repeats: once each
    captions = {item.caption for ex in examples for item in ex.items}
    texts = sorted(captions | {""} | set(prompts) | set(class_captions.values()))
    text_keys = {t: cache.text_key(text_id, t, seq_len, dtype, family.NAME) for t in texts}
    if main:
        try:
            _build_cache(cfg, family, c, images, text_keys, cache_dir, dtype, device, seq_len, vae_scale)
        except Exception as e:  # the other processes wait for the broadcast below: tell them, then raise
            broadcast_object_list([f"{type(e).__name__}: {e}"])
            raise
    failure = broadcast_object_list([None])[0]  # also the barrier: the cache is complete past this line
    if failure is not None:
        raise FinetuneError(f"the main process could not build the cache ({failure})", EXIT_FAILURE)
    for ex in examples:
        ex.load(cache_dir, family, c.vae)
    text = {t: cache.read_tensors(cache.text_file(cache_dir, k)) for t, k in text_keys.items()}
    if not sample_inputs:  # only the decoder is needed from here on (samples); edit samples encode their inputs
        c.vae.encoder = None
    gc.collect()
    cache_s = time.perf_counter() - t_cache
    if main:  # the run folder appears only once the inputs have passed every check
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        _log_to(run_dir / "train.log")
    accelerator.init_trackers("logs")  # TensorBoard events in <run>/logs, W&B in <run>/wandb (main process only)
    entries = train_ex.entries
    log.info(
        "run %s: %d images, %d entries, device %s, dtype %s, base weights %s, %d process(es), %s",
        run_dir,
        len(dataset.items),
        len(entries),
        device,
        dtype,
        quantize or "not quantized",
        accelerator.num_processes,
        "FSDP: weights sharded over the processes" if sharded else "data-parallel",
    )

    # ---- the transformer (alone on the device with the VAE decoder), LoRA, optimizer, schedule; then a checkpoint --
    transformer = family.load_components(
        cfg.base_model, dtype=dtype, device=device, parts=("transformer",), quantize=quantize
    ).transformer
    lora.add_lora(
        transformer,
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        targets=cfg.lora.targets,
        dropout=cfg.lora.dropout,
        seed=cfg.train.seed,
    )
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    if sharded:  # before the optimizer exists, so it holds the sharded parameters
        _shard(transformer)
    params = lora.lora_parameters(transformer)
    optimizer = optim.build_optimizer(
        cfg.train.optimizer, params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, device=device
    )
    # The schedule steps once per optimizer step, so it is not handed to accelerate (which steps it per process).
    scheduler = optim.build_lr_scheduler(
        optimizer, cfg.train.lr_scheduler, warmup_steps=cfg.train.warmup_steps, total_steps=cfg.train.steps
    )
    if cfg.train.compile and quantize:
        left = fused_lora.prepare_int8_for_compile(transformer, transformer._repeated_blocks)
        if left:  # all-linear leaves none; say which if a model brings other Linears into its blocks
            raise FinetuneError(
                f"train.compile: {len(left)} int8 Linears in the blocks are not fused LoRA layers ({left[0]}, ...), "
                "and torch.compile cannot compile them; set train.compile=false or train.quantize=none"
            )
    if cfg.train.compile:  # regional: each block class compiles once and serves all its blocks (diffusers).
        # Several bucket shapes: one graph for a dynamic sequence length (the second shape would force it anyway).
        dynamic = len({entry.bucket for entry in entries}) > 1 or None
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic)
    if sharded:  # FSDP reduce-scatters the LoRA's gradients itself: accelerate must not wrap the model in DDP too
        model, optimizer = transformer, accelerator.prepare(optimizer)
    else:
        # DDP would broadcast every parameter from rank 0 at start: the frozen base is loaded the same by every
        # process (24 GB of FLUX.1 for nothing), and int8 (torchao) weights cannot be broadcast. Only the LoRA syncs.
        frozen = [name for name, p in transformer.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen)
        model, optimizer = accelerator.prepare(transformer, optimizer)
    start = 0
    torch.manual_seed(cfg.train.seed)  # LoRA dropout is the only user of the global RNG
    # EMA of the LoRA (train.ema): float32, on the CPU (one copy per step, no device memory) or beside the weights.
    ema = None
    if cfg.train.ema.decay:
        ema = lora.ema_weights(transformer, "cpu" if cfg.train.ema.device == "cpu" else device)
    if state is not None:
        lora.set_lora_state(transformer, state["lora"])
        checkpoint.load_optimizer_state(transformer, optimizer, state["optimizer"], sharded=sharded)
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema = {k: v.to(next(iter(ema.values())).device) for k, v in state["ema"].items()}
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
        log.info("resumed from %s at step %d", ckpt, start)

    # ---- loop -------------------------------------------------------------------------------------------------------
    guidance = cfg.train.guidance if getattr(transformer.config, "guidance_embeds", False) else None  # dev only
    batch = _Batches(cfg, family, train_ex, text, c.vae, accelerator, dtype)
    batch.class_captions = class_captions
    reg_batch = _Batches(cfg, family, reg_ex, text, c.vae, accelerator, dtype, "regularization") if reg_ex else None
    parts = [(batch, None)] + ([(reg_batch, cfg.train.regularization.weight)] if reg_batch else [])
    preservation = cfg.train.preservation.weight if class_captions else 0.0
    val = _validation_batch(cfg, family, val_ex or train_ex, text, c.vae, device, dtype)
    sampling = _sampling(cfg, family, c, transformer, text, prompts, sample_inputs) if main or sharded else None
    if sampling is not None and cfg.sample.preview_model:
        weights = lora.lora_state_dict(transformer)  # under FSDP every process takes part in gathering the shards
        if main:
            sampling["preview"] = _preview(cfg, family, c, weights, dtype, quantize)
    losses = torch.zeros(cfg.train.steps, device=device)
    bar = tqdm(total=cfg.train.steps, initial=start, unit="step", disable=not main, dynamic_ncols=True)
    smoothed, logged, t_loop, t_log = None, start, time.perf_counter(), time.perf_counter()
    if start == 0:
        _evaluate(cfg, family, 0, transformer, val, guidance, sampling, run_dir, accelerator, ema)
        t_loop = t_log = time.perf_counter()
    accum = cfg.train.gradient_accumulation
    for step in range(start, cfg.train.steps):
        # Each micro-batch of training images, then (train.regularization) one of class images: a backward each.
        for micro, (source, weight) in ((m, p) for m in range(accum) for p in parts):
            sync = micro == accum - 1 and source is parts[-1][0]
            if sharded:  # FSDP's own switch for reduce-scattering gradients; autocast, which prepare() adds to DDP
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or sharded else accelerator.no_sync(model):
                with accelerator.autocast() if sharded else contextlib.nullcontext():
                    b = source(step * accum + micro)
                    if preservation and source is batch:
                        loss = _preservation_loss(family, model, transformer, b, guidance, preservation, accelerator)
                    else:
                        loss = _flow_loss(family, model, b, guidance)
                    if weight is not None:
                        loss = weight * loss
                accelerator.backward(loss / accum)
            losses[step] += loss.detach() / accum
        if cfg.train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        if ema is not None:
            lora.update_ema(ema, transformer, cfg.train.ema.decay)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % LOG_EVERY == 0 or done == cfg.train.steps:  # the only host read of the loss
            interval = accelerator.reduce(losses[logged:done].clone(), "mean").tolist()
            s_per_it = (time.perf_counter() - t_log) / (done - logged)
            lr = scheduler.get_last_lr()[0]
            rows = []
            for i, value in enumerate(interval):
                smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
                row = {
                    "step": logged + i + 1,
                    "loss": value,
                    "loss_smoothed": smoothed,
                    "lr": lr,
                    "s_per_it": s_per_it,
                }
                rows.append(row)
            _metrics(run_dir, main, *rows)
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", mem=_peak_memory(device))
            accelerator.log(
                {"loss": interval[-1], "loss_smoothed": smoothed, "lr": lr, "s_per_it": s_per_it}, step=done
            )
            logged, t_log = done, time.perf_counter()
        bar.update(1)
        if cfg.train.save_every and done % cfg.train.save_every == 0 or done == cfg.train.steps:
            _save(cfg, family, run_dir, done, transformer, optimizer, scheduler, dataset.digest, main, sharded, ema)
            accelerator.wait_for_everyone()
        if cfg.sample.every and done % cfg.sample.every == 0 and done != cfg.train.steps:
            t_eval = time.perf_counter()
            _evaluate(cfg, family, done, transformer, val, guidance, sampling, run_dir, accelerator, ema)
            t_log += time.perf_counter() - t_eval  # s/it counts training steps only
            t_loop += time.perf_counter() - t_eval
    bar.close()
    train_s = time.perf_counter() - t_loop
    _evaluate(cfg, family, cfg.train.steps, transformer, val, guidance, sampling, run_dir, accelerator, ema)

    # ---- register: the main process adds the version, the others read it back ------------------------------------
    ref = [None]
    weights = lora.lora_state_dict(transformer)  # under FSDP every process takes part in gathering the shards
    if ema is not None:  # the registered file holds the EMA weights; checkpoints keep the raw ones for resuming
        weights = {k: v.to("cpu", copy=True) for k, v in ema.items()}
    if main:
        lora_file = lora.save_lora(
            run_dir / "lora.safetensors",
            weights,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            base_model=cfg.base_model,
            trigger_word=cfg.trigger_word,
            targets=cfg.lora.targets,
            dtype=models.resolve_dtype(cfg.lora.save_dtype, "cpu"),
            alpha_keys=family.LORA_ALPHA_KEYS,
        )
        timings = {"total_s": time.perf_counter() - t0, "cache_s": cache_s, "train_s": train_s}
        timings["s_per_step"] = train_s / max(1, cfg.train.steps - start)
        lineage = {
            "base_model": cfg.base_model,
            "family": family.NAME,
            "trigger_word": cfg.trigger_word,
            "backend": "local",
            "dataset": {"path": _dataset_paths(dataset), "digest": dataset.digest},
            "config": config_to_dict(cfg),
            "timings": timings,
            "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.targets},
            "run_dir": str(run_dir),
            "processes": accelerator.num_processes,
        }
        ref = [registry.add_version(cfg.output, lora_file, lineage).ref]
        log.info("registered %s", ref[0])
    accelerator.wait_for_everyone()
    ref = broadcast_object_list(ref)
    # Every process drops its DDP wrapper while the process group is alive, then waits for the others; only then does
    # end_training destroy the group. A DDP wrapper freed after that holds the group's last reference, and a gloo
    # group destroyed after its peer has exited can wait forever in its destructor (seen with 2 CPU processes).
    model = optimizer = None
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return registry.resolve(ref[0])


# ---- setup helpers -------------------------------------------------------------------------------------------------


def _run_dir(cfg: Config, resume: bool | str) -> tuple[Path, Path | None]:
    """The run folder (agreed by all processes) and the checkpoint to resume from, if any."""
    name = cfg.output.split("/", 1)[1]
    runs_root = Path("runs")
    if isinstance(resume, str) and resume:
        run_dir = Path(resume).expanduser()
    elif resume:
        run_dir = (
            Path(cfg.train.output_dir)
            if cfg.train.output_dir
            else checkpoint.newest_run_with_checkpoint(runs_root, name)
        )
        if run_dir is None:
            raise FinetuneError(f"--resume: no run folder {runs_root}/{name}-* with a checkpoint; train without it")
    else:
        run_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else None
    if resume:
        ckpt = checkpoint.latest_checkpoint(run_dir)
        if ckpt is None:
            raise FinetuneError(f"--resume: {run_dir} holds no checkpoint (checkpoints/step-*/); train without it")
        return run_dir, ckpt
    if run_dir is None:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        stamp = broadcast_object_list(stamp)  # processes start at slightly different times
        run_dir = runs_root / f"{name}-{stamp[0]}"
        n = 1
        while (run_dir / "checkpoints").exists():  # two runs started in the same second
            n += 1
            run_dir = runs_root / f"{name}-{stamp[0]}-{n}"
    elif checkpoint.latest_checkpoint(run_dir) is not None:
        raise FinetuneError(
            f"train.output_dir: {run_dir} already holds checkpoints of a run; continue it with --resume or choose "
            "another train.output_dir"
        )
    return run_dir, None


def _check_resumable(cfg: Config, state: dict, digest: str, ckpt: Path) -> None:
    """A run continues exactly only with the settings and data it started with."""
    old, new = _flat(state["config"]), _flat(config_to_dict(cfg))
    defaults = _flat(config_to_dict(Config()))  # a key added since the checkpoint was written counts at its default
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k, defaults.get(k)) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise FinetuneError(f"--resume: {ckpt} was trained with other settings ({diff}); resume with the same config")
    if state["dataset_digest"] != digest:
        raise FinetuneError(
            f"--resume: dataset {cfg.dataset} changed since {ckpt} was written; resume with the same zip"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _build_cache(cfg, family, c, images, text_keys, cache_dir, dtype, device, seq_len, vae_scale):
    """Encode what the cache lacks: estimate its size against the free disk first, then free the encoders.
    ``images``: (latent key, zip, zip entry, bucket, flipped) of every target and reference."""
    missing_latents = [i for i, image in enumerate(images) if not cache.latent_file(cache_dir, image[0]).is_file()]
    missing_texts = [(k, t) for t, k in text_keys.items() if not cache.text_file(cache_dir, k).is_file()]
    if not missing_latents and not missing_texts:
        log.info("cache: every latent and caption is cached in %s", cache_dir)
        return
    encoders = None
    itemsize = torch.empty(0, dtype=dtype).element_size()
    needed = cache.estimate_latent_bytes(
        [images[i][3] for i in missing_latents], c.vae.config.latent_channels, vae_scale, itemsize
    )
    if missing_texts:
        encoders = family.load_components(cfg.base_model, dtype=dtype, device=device, parts=family.TEXT_PARTS)
        needed += len(missing_texts) * family.text_bytes(encoders, seq_len, itemsize)
    cache.check_free_space(cache_dir, needed)
    log.info("cache: encoding %d latents and %d captions into %s", len(missing_latents), len(missing_texts), cache_dir)
    with contextlib.ExitStack() as stack:
        zips: dict[Path, zipfile.ZipFile] = {}

        def pixels(path: Path, name: str, bucket: tuple[int, int], flipped: bool) -> torch.Tensor:
            if path not in zips:
                zips[path] = stack.enter_context(zipfile.ZipFile(path))
            image = load_bucket_image(zips[path], name, bucket)
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
            x = x.permute(2, 0, 1).float() / 127.5 - 1.0  # [3, h, w] in [-1, 1]
            return x.flip(-1) if flipped else x  # train.flip: the mirror image, encoded once like any other

        jobs = [(images[i][0], lambda job=images[i]: pixels(*job[1:])) for i in missing_latents]
        cache.cache_latents(cache_dir, jobs, lambda px: family.encode_images(c.vae, px))
    if encoders is not None:
        cache.cache_texts(cache_dir, missing_texts, lambda t: family.encode_prompts(encoders, t, seq_len))
        del encoders  # the text encoders leave memory before the loop starts
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- data helpers ---------------------------------------------------------------------------------------------------


@dataclass
class _Examples:
    """The entries of one role (training, held-out validation, regularisation images) and their cached tensors:
    ``plan`` names the latents to cache, ``load`` reads them (and the masks) once the cache is complete."""

    dataset: Dataset
    items: tuple[Item, ...]
    entries: list[Entry]
    keys: list[str]  # latent key per entry
    flip_keys: list[str] | None  # of the mirror images (train.flip)
    ref_keys: list[list[str]]
    flip_ref_keys: list[list[str]] | None
    images: list[tuple]  # (key, zip, name, bucket, flipped): what the cache needs
    latents: list[dict] = dataclasses.field(default_factory=list)
    flipped: list[dict] | None = None
    references: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)
    flipped_references: list[list[torch.Tensor]] | None = None
    masks: list[torch.Tensor | None] = dataclasses.field(default_factory=list)  # [1, H, W] in [0, 1] per entry

    @classmethod
    def plan(cls, dataset, items, *, cfg, vae_id, dtype, multiple, repeats=False) -> _Examples:
        entries = assign_buckets(items, cfg.train.resolution, multiple=multiple)
        if repeats:  # a dataset list's {path, repeats}: each entry that many times per epoch
            entries = [e for e in entries for _ in range(items[e.item].repeats)]
        key = functools.partial(cache.latent_key, vae_id, dtype=dtype)
        keys, ref_keys, images, ref_images = [], [], [], []
        flip_keys, flip_ref_keys = ([], []) if cfg.train.flip else (None, None)
        for e in entries:
            item, zip_path = items[e.item], dataset.zip_of(items[e.item])
            # Edit pairs: each reference is encoded at its target's bucket (so a batch stacks them; FLUX.2 would also
            # take a reference at its own size up to 1 MP), keyed by its content like a target.
            for flipped in (False, True) if cfg.train.flip else (False,):
                k = key(item.sha256, e.bucket, flipped=flipped)
                refs = [key(r.sha256, e.bucket, flipped=flipped) for r in item.references]
                (flip_keys if flipped else keys).append(k)
                (flip_ref_keys if flipped else ref_keys).append(refs)
                images.append((k, zip_path, item.name, e.bucket, flipped))
                ref_images += [
                    (rk, zip_path, r.name, e.bucket, flipped) for rk, r in zip(refs, item.references, strict=True)
                ]
        # targets first, then references: the order (and so the VAE's batches) the cache was always built in
        return cls(dataset, items, entries, keys, flip_keys, ref_keys, flip_ref_keys, images + ref_images)

    def load(self, cache_dir: Path, family, vae) -> None:
        read = functools.cache(lambda k: cache.read_tensors(cache.latent_file(cache_dir, k)))  # repeats share
        self.latents = [read(k) for k in self.keys]
        self.flipped = [read(k) for k in self.flip_keys] if self.flip_keys is not None else None
        # References as the pipeline encodes them: the distribution's mean (its mode, no draw), normalized once.
        normalized = functools.cache(lambda k: family.normalize_latents(read(k)["mean"].float()[None], vae)[0])
        self.references = [[normalized(k) for k in keys] for keys in self.ref_keys]  # [C, h, w] per reference
        if self.flip_ref_keys is not None:
            self.flipped_references = [[normalized(k) for k in keys] for keys in self.flip_ref_keys]
        self.masks = _read_masks(self.dataset, self.items, self.entries)


def _read_masks(dataset: Dataset, items, entries) -> list[torch.Tensor | None]:
    """Each entry's mask (``<stem>_mask.png``, white = learn) at its bucket's pixels, cropped as its image, as
    [1, H, W] in [0, 1]; None for an image without one."""
    out: list[torch.Tensor | None] = []
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for e in entries:
            mask = items[e.item].mask
            if mask is None:
                out.append(None)
                continue
            path = dataset.zip_of(items[e.item])
            zf = zips.setdefault(path, zipfile.ZipFile(path))
            image = load_bucket_image(zf, mask.name, e.bucket, mode="L")
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, image.height, image.width)
            out.append(x.float() / 255.0)
    finally:
        for zf in zips.values():
            zf.close()
    return out


def mask_to_latent_grid(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [.., H, W] as loss weights on the latent grid [.., h, w]: the mean over each f×f block of pixels
    that one latent covers (f = H / h: 8 for FLUX.1's VAE, 16 for FLUX.2's with its 2×2 patchify), as the VAE
    downsamples by f with no overlap at its output; kohya's masked loss does the same with an area resize."""
    f = mask.shape[-2] // latent_hw[0]
    if mask.shape[-1] // latent_hw[1] != f or mask.shape[-2] % f or mask.shape[-1] % f:
        raise ValueError(f"mask of {tuple(mask.shape[-2:])} does not tile the latent grid {latent_hw}")
    return F.avg_pool2d(mask, f)


def _held_out(cfg: Config, dataset: Dataset) -> tuple[Dataset, Dataset | None]:
    """(the images to train on, the held-out ones for the validation loss or None). ``train.validation.split``
    holds out that share of the images (at least one), chosen by a hash of the seed and each image's content, so
    the choice depends on neither the zip's order nor the process count; every copy of a held-out image (another
    zip of a list) is held out with it. ``train.validation.dataset`` is a zip of its own."""
    val = cfg.train.validation
    if val.dataset:
        held = read_dataset(val.dataset, cfg.trigger_word)
        return dataset, dataclasses.replace(
            held, items=tuple(dataclasses.replace(i, zip_path=held.path) for i in held.items)
        )
    if not val.split:
        return dataset, None
    shas = sorted({item.sha256 for item in dataset.items}, key=lambda h: sample_seed(cfg.train.seed, -2, 0, h))
    n = max(1, round(val.split * len(shas)))
    if n >= len(shas):
        raise FinetuneError(
            f"train.validation.split: {val.split:g} of {len(shas)} image(s) holds out {n}, leaving none to train "
            "on; lower it or add images",
            EXIT_USAGE,
        )
    held = set(shas[:n])
    keep = tuple(item for item in dataset.items if item.sha256 not in held)
    out = tuple(
        dataclasses.replace(item, zip_path=dataset.zip_of(item)) for item in dataset.items if item.sha256 in held
    )
    return dataclasses.replace(dataset, items=keep), dataclasses.replace(dataset, items=out)


def _dataset_paths(dataset: Dataset) -> str | list:
    """The dataset's zip for the lineage, or its zips and repeats when it was a list."""
    if not dataset.sources:
        return str(dataset.path)
    return [{"path": str(path), "repeats": repeats} for path, repeats in dataset.sources]


# ---- loop helpers ---------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    latents: torch.Tensor  # [B, C, h, w], normalized (the family's latent space: FLUX.1 [16, h, w], FLUX.2 [128, ...])
    noise: torch.Tensor  # like latents
    sigmas: torch.Tensor  # [B]
    text: dict[str, torch.Tensor]  # the family's text tensors, [B, ...] each
    img_ids: torch.Tensor  # [tokens, 3 or 4]
    txt_ids: torch.Tensor  # [seq, 3 or 4]
    references: list[torch.Tensor] = dataclasses.field(default_factory=list)  # edit pairs: [B, C, h, w] per index
    class_text: dict[str, torch.Tensor] | None = None  # train.preservation: the class captions' text tensors
    loss_weights: torch.Tensor | None = None  # masks on the latent grid, packed like the target [B, tokens, D]


def _stack_text(rows: list[dict[str, torch.Tensor]], **to) -> dict[str, torch.Tensor]:
    return {name: torch.stack([r[name] for r in rows]).to(**to) for name in rows[0]}


class _Batches:
    """``batches(index)``: this process's share of global micro-batch ``index``, with per-sample randomness drawn
    from (seed, index, sample id) so any process count sees the same samples with the same noise; ``stream`` names
    another order and draws from the same seed (the regularisation images')."""

    def __init__(self, cfg, family, ex: _Examples, text, vae, accelerator, dtype, stream: str = ""):
        self.cfg, self.family, self.ex, self.stream = cfg, family, ex, stream
        self.text, self.vae, self.dtype, self.device = text, vae, dtype, accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.order = BatchOrder(ex.entries, cfg.train.batch_size, cfg.train.seed, stream)
        self.ids: dict[tuple[int, ...], torch.Tensor] = {}  # image position ids per latent shape
        self.class_captions: dict[str, str] = {}  # train.preservation: caption → class caption
        self.masked = any(m is not None for m in ex.masks)
        seq = next(iter(text.values()))["prompt_embeds"].shape[0]  # every caption is cached at one length
        self.txt_ids = family.text_ids(seq, self.device, dtype)

    def __call__(self, index: int) -> _Batch:
        cfg, family, ex = self.cfg, self.family, self.ex
        chosen = self.order(index)
        rows = []
        for sample_id in range(self.rank, len(chosen), self.world):
            entry = chosen[sample_id]
            seed = sample_seed(cfg.train.seed, index, sample_id, self.stream)
            flipped = ex.flipped is not None and _coin(sample_seed(cfg.train.seed, index, sample_id, "flip"))
            latent = (ex.flipped if flipped else ex.latents)[entry]
            mean, std = latent["mean"].float(), latent["std"].float()
            g = torch.Generator().manual_seed(seed)
            z = mean + std * torch.randn(mean.shape, generator=g)  # a fresh draw from the latent distribution
            z = family.normalize_latents(z[None], self.vae)[0]
            noise = torch.randn(z.shape, generator=g)
            sigma = flow.sample_sigmas(cfg.train.sigma_sampling, 1, family.image_seq_len(z.shape), g)
            dropped = torch.rand(1, generator=g).item() < cfg.train.caption_dropout
            own = ex.items[ex.entries[entry].item].caption
            caption = "" if dropped else own
            refs = (ex.flipped_references if flipped else ex.references)[entry]
            weights = None
            if self.masked:  # train.flip mirrors the mask with its image
                mask = ex.masks[entry]
                mask = torch.ones((1, *ex.entries[entry].bucket[::-1])) if mask is None else mask
                weights = mask_to_latent_grid(mask.flip(-1) if flipped else mask, z.shape[-2:]).expand_as(z)
            rows.append((z, noise, sigma, self.text[caption], refs, own, weights))
        z = torch.stack([r[0] for r in rows])
        references = zip(*[r[4] for r in rows], strict=True)  # reference i of every sample, for each i
        if z.shape[1:] not in self.ids:
            self.ids[z.shape[1:]] = family.image_ids(z.shape[1:], self.device, self.dtype)
        to = dict(device=self.device, non_blocking=True)
        return _Batch(
            latents=z.to(dtype=self.dtype, **to),
            noise=torch.stack([r[1] for r in rows]).to(dtype=self.dtype, **to),
            sigmas=torch.cat([r[2] for r in rows]).to(**to),
            text=_stack_text([r[3] for r in rows], dtype=self.dtype, **to),
            img_ids=self.ids[z.shape[1:]],
            txt_ids=self.txt_ids,
            references=[torch.stack(refs).to(dtype=self.dtype, **to) for refs in references],
            class_text=_class_text(self, [r[5] for r in rows], to),
            loss_weights=family.pack_latents(torch.stack([r[6] for r in rows])).to(**to) if self.masked else None,
        )


def _coin(seed: int) -> bool:
    """A fair coin from ``seed`` (train.flip: which of the two cached latents a sample uses)."""
    return torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < 0.5


def _class_text(batches, captions: list[str], to: dict) -> dict[str, torch.Tensor] | None:
    """The class captions of ``captions`` (the samples' own, dropped or not) as one batch, or None without DOP."""
    if not batches.class_captions:
        return None
    return _stack_text([batches.text[batches.class_captions[c]] for c in captions], dtype=batches.dtype, **to)


def _flow_loss(family, model, b: _Batch, guidance: float | None) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - latents`` at ``x_σ`` (DESIGN.md; flow.py)."""
    noisy = flow.add_noise(b.latents, b.noise, b.sigmas)
    model_pred = family.predict(model, noisy, b.sigmas, b.text, b.img_ids, b.txt_ids, guidance, b.references or None)
    # packing is a permutation: same MSE; with references the loss covers the target's tokens only (predict cuts)
    target = family.pack_latents(flow.flow_target(b.latents, b.noise))
    if b.loss_weights is not None:
        return masked_mse(model_pred, target, b.loss_weights)
    return F.mse_loss(model_pred.float(), target.float())


def masked_mse(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean(w · (pred − target)²)``: kohya's masked loss (``apply_masked_loss``: the per-element loss times the
    mask, then the mean), so a weight of 0 removes an element from the loss and its gradient, and all-ones weights
    give the plain MSE."""
    return (weights.float() * (model_pred.float() - target.float()).square()).mean()


def _preservation_loss(family, model, base, b: _Batch, guidance, weight: float, accelerator) -> torch.Tensor:
    """The flow loss plus ``weight`` × differential output preservation (ai-toolkit's ``diff_output_preservation``,
    reference/local-trainers.md §1): on the same noisy latents, the prediction for the class captions with the LoRA
    is pulled towards the base model's own (the LoRA disabled, no gradient), so the trigger word's change stays off
    the class. The two predictions with the LoRA run as one batch, so DDP sees one forward per backward."""
    noisy = flow.add_noise(b.latents, b.noise, b.sigmas)
    refs = b.references or None
    with torch.no_grad(), lora.lora_disabled(base), accelerator.autocast():
        prior = family.predict(base, noisy, b.sigmas, b.class_text, b.img_ids, b.txt_ids, guidance, refs)
    both = {k: torch.cat([b.text[k], b.class_text[k]]) for k in b.text}
    two = lambda t: torch.cat([t, t])  # noqa: E731
    model_pred = family.predict(
        model, two(noisy), two(b.sigmas), both, b.img_ids, b.txt_ids, guidance, [two(r) for r in refs or ()] or None
    )
    n = b.latents.shape[0]
    target = family.pack_latents(flow.flow_target(b.latents, b.noise))
    if b.loss_weights is not None:  # the mask weights the subject's images; the class prompts are kept whole
        loss = masked_mse(model_pred[:n], target, b.loss_weights)
    else:
        loss = F.mse_loss(model_pred[:n].float(), target.float())
    return loss + weight * F.mse_loss(model_pred[n:].float(), prior.float())


def _validation_batch(cfg, family, ex: _Examples, text, vae, device, dtype) -> list[_Batch]:
    """Fixed batches for the validation loss: the first images of ``ex`` (the held-out ones with
    train.validation, else the training images) at each σ in VAL_SIGMAS with fixed noise, unmasked."""
    out = []
    n = len(VAL_SIGMAS)
    for i, entry in enumerate(ex.entries[:VAL_ITEMS]):
        z = family.normalize_latents(ex.latents[i]["mean"].float()[None], vae)[0]
        g = torch.Generator().manual_seed(sample_seed(cfg.train.seed, -1, i, "validation"))
        noise = torch.randn((n, *z.shape), generator=g)
        emb = text[ex.items[entry.item].caption]
        out.append(
            _Batch(
                latents=z.expand_as(noise).to(device=device, dtype=dtype),
                noise=noise.to(device=device, dtype=dtype),
                sigmas=torch.tensor(VAL_SIGMAS, device=device),
                text={k: v.expand(n, *v.shape).to(device=device, dtype=dtype) for k, v in emb.items()},
                img_ids=family.image_ids(z.shape, device, dtype),
                txt_ids=family.text_ids(emb["prompt_embeds"].shape[0], device, dtype),
                references=[r.expand(n, *r.shape).to(device=device, dtype=dtype) for r in ex.references[i]],
            )
        )
    return out


def _sample_inputs(cfg: Config, family, dataset) -> tuple[Dataset, list[str], list[list] | None]:
    """The dataset to train on, the sample prompts and their input images (edits; None: text-to-image samples).

    ``sample.inputs`` entries are image paths (their instructions are ``sample.prompts``, in order) or
    ``dataset:<stem>``: that pair is held out of training and its references are the input, its instruction the prompt
    (unless ``sample.prompts`` is set). With no ``sample.inputs`` and no ``sample.prompts``, a pair zip samples its
    first two pairs (kept in training). Everything is checked here, before any model loads.

    Raises:
        FinetuneError: inputs for a family that takes none, an unknown stem or unreadable file, a count that does not
            match ``sample.prompts``, or no pair left to train on.
    """
    from PIL import Image

    explicit = "sample.prompts" in cfg.explicit
    pairs = any(item.references for item in dataset.items)
    if not cfg.sample.inputs:
        if not pairs or explicit or not family.MAX_REFERENCES:
            return dataset, list(cfg.sample.prompts), None
        chosen, held = list(dataset.items[:2]), set()
    else:
        if not family.MAX_REFERENCES:
            raise FinetuneError(
                f"sample.inputs: {cfg.base_model} is {family.LABEL}, which takes no input images; sample inputs are "
                "for edit LoRAs (FLUX.1 Kontext, FLUX.2). Remove the key.",
                EXIT_USAGE,
            )
        by_stem = _pairs_by_stem(dataset)
        chosen, held = [], set()
        for entry in cfg.sample.inputs:
            if entry.startswith("dataset:"):
                stem = entry.removeprefix("dataset:")
                if stem not in by_stem:
                    known = ", ".join(sorted(by_stem)[:6]) or "none: it holds single images, not pairs"
                    raise FinetuneError(
                        f"sample.inputs: {entry!r}: {dataset.path} has no pair {stem!r} (its pairs: {known})",
                        EXIT_USAGE,
                    )
                chosen.append(by_stem[stem])
                held.add((dataset.zip_of(by_stem[stem]), by_stem[stem].name))
            else:
                chosen.append(Path(entry).expanduser())
        if not explicit and any(isinstance(c, Path) for c in chosen):
            raise FinetuneError(
                "sample.inputs: an image path needs its instruction: set sample.prompts, one per input, in order",
                EXIT_USAGE,
            )
    if explicit and len(cfg.sample.prompts) != len(chosen):
        raise FinetuneError(
            f"sample.inputs: {len(chosen)} input(s) but {len(cfg.sample.prompts)} sample.prompts; give one prompt "
            "per input, in order",
            EXIT_USAGE,
        )
    inputs = []
    for choice in chosen:
        try:
            if isinstance(choice, Path):
                with Image.open(choice) as im:
                    inputs.append([im.convert("RGB")])
            else:  # a pair's references, from the zip that holds it (a dataset list has several)
                with zipfile.ZipFile(dataset.zip_of(choice)) as zf:
                    inputs.append([Image.open(io.BytesIO(zf.read(r.name))).convert("RGB") for r in choice.references])
        except (OSError, ValueError) as e:
            raise FinetuneError(f"sample.inputs: cannot read {choice} as an image ({e})", EXIT_USAGE) from e
    if len(inputs[0]) > family.MAX_REFERENCES or any(len(i) != len(inputs[0]) for i in inputs):
        raise FinetuneError(
            f"sample.inputs: every sample needs the same number of input images, at most {family.MAX_REFERENCES} "
            f"for {family.LABEL}; got {[len(i) for i in inputs]}",
            EXIT_USAGE,
        )
    prompts = list(cfg.sample.prompts) if explicit else [c.caption for c in chosen]
    kept = tuple(item for item in dataset.items if (dataset.zip_of(item), item.name) not in held)
    if not kept:
        raise FinetuneError("sample.inputs: every pair of the dataset is held out; keep at least one to train on")
    return dataclasses.replace(dataset, items=kept), prompts, inputs


def _pairs_by_stem(dataset: Dataset) -> dict[str, Item]:
    """The pairs of the pair zip(s) by stem: their own (``<stem>_end.png``, a content hash after `finetune prepare`)
    and the one each was prepared from (``metadata.jsonl`` ``source``: ``pair1`` for ``photos/pair1_end.jpg``); with
    a dataset list, the first zip that has a stem wins."""
    pairs = {(dataset.zip_of(item), item.name): item for item in dataset.items if item.references}
    by_stem: dict[str, Item] = {}
    for (_, name), item in pairs.items():
        by_stem.setdefault(name.rsplit(".", 1)[0].removesuffix("_end"), item)
    for path in dict.fromkeys(zip_path for zip_path, _ in pairs):
        with zipfile.ZipFile(path) as zf:
            lines = zf.read("metadata.jsonl").decode().splitlines() if "metadata.jsonl" in zf.namelist() else []
        for line in lines:
            row = json.loads(line) if line.strip() else {}
            if (path, row.get("file_name")) in pairs and isinstance(row.get("source"), str):
                by_stem.setdefault(Path(row["source"]).stem.removesuffix("_end"), pairs[(path, row["file_name"])])
    return by_stem


def _sampling(cfg, family, c, transformer, text, prompts, inputs) -> dict | None:
    if not cfg.sample.every or not prompts or not cfg.sample.seeds:
        return None
    defaults = family.default_sampling(cfg.base_model)
    return {
        "pipe": family.sampling_pipeline(transformer, c.vae, c.scheduler),
        "inputs": inputs,
        "prompts": prompts,
        "steps": cfg.sample.steps or defaults["steps"],
        "size": cfg.sample.size or defaults["size"],
        "guidance": cfg.sample.guidance or defaults["guidance"],
        "text": _stack_text([text[p] for p in prompts]),
        "negative_text": _stack_text([text[""]]),
    }


def _preview(cfg, family, c, weights, dtype, quantize) -> dict:
    """``sample.preview_model`` with a copy of the LoRA: kept on the CPU, moved to the device only to sample, so
    training holds one transformer on the GPU. Its defaults (distilled klein: 4 steps, CFG 1) set steps and guidance.

    Raises:
        FinetuneError: a preview model whose layers do not take this LoRA (another size).
    """
    model = family.load_components(cfg.sample.preview_model, dtype=dtype, parts=("transformer",), quantize=quantize)
    preview = model.transformer
    lora.add_lora(preview, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets, seed=cfg.train.seed)
    try:
        lora.set_lora_state(preview, weights)
    except Exception as e:  # peft/torch report a shape mismatch in their own words
        raise FinetuneError(
            f"sample.preview_model: {cfg.sample.preview_model} does not take a LoRA of {cfg.base_model} ({e}); name a "
            "checkpoint of the same size (klein-base-4B → FLUX.2-klein-4B, 9B → 9B)"
        ) from e
    defaults = family.default_sampling(cfg.sample.preview_model)
    pipe = family.sampling_pipeline(preview, c.vae, c.scheduler)
    return {"transformer": preview, "pipe": pipe, "steps": defaults["steps"], "guidance": defaults["guidance"]}


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a few eval shapes are not worth compiling (no-op when not compiled)
def _evaluate(cfg, family, step, transformer, val, guidance, sampling, run_dir, accelerator, ema=None) -> None:
    """Fixed-σ validation loss and sample images, into metrics.jsonl, samples/ and the trackers. With DDP the main
    process alone runs them on the bare model (no collective); under FSDP every process runs them, since each
    forward gathers the blocks' shards from all of them, and the main process writes. With ``ema`` (train.ema) they
    use the EMA weights, swapped in for the call and the trained ones copied back exactly after it."""
    main = accelerator.is_main_process
    if not (main or _is_sharded(transformer)):
        return
    if ema is not None:
        trained = lora.lora_state_dict(transformer)
        lora.set_lora_state(transformer, ema)
        try:
            _evaluate(cfg, family, step, transformer, val, guidance, sampling, run_dir, accelerator)
        finally:
            lora.set_lora_state(transformer, trained)
        return
    transformer.eval()
    val_loss = sum(_flow_loss(family, transformer, b, guidance).item() for b in val) / max(1, len(val))
    if main:
        _metrics(run_dir, True, {"step": step, "val_loss": val_loss})
        accelerator.log({"val_loss": val_loss}, step=step)
    if sampling is not None:
        render = functools.partial(
            family.sample_images,
            prompts=sampling["prompts"],
            seeds=list(cfg.sample.seeds),
            size=sampling["size"],
            text=sampling["text"],
            negative_text=sampling["negative_text"],
            inputs=sampling["inputs"],
        )
        images = render(sampling["pipe"], steps=sampling["steps"], guidance=sampling["guidance"])
        weights = lora.lora_state_dict(transformer) if cfg.sample.preview_model else None  # all processes: FSDP
        preview = sampling.get("preview")
        if preview is not None:  # the same LoRA on the preview model, on the device only while it samples
            lora.set_lora_state(preview["transformer"], weights)
            preview["transformer"].to(transformer.device)
            previews = render(preview["pipe"], steps=preview["steps"], guidance=preview["guidance"])
            preview["transformer"].to("cpu")
        if not main:
            transformer.train()
            return
        folder = run_dir / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(p, s) for p in range(len(sampling["prompts"])) for s in cfg.sample.seeds]
        by_prompt: dict[str, list] = {}
        if sampling["inputs"]:  # edits: each row starts with its input, as the model saw it (input → outputs)
            for p, refs in enumerate(sampling["inputs"]):
                fitted = models.fit_inputs(refs, sampling["size"])
                for i, image in enumerate(fitted):
                    image.save(folder / f"prompt{p}-input{f'_{i + 1}' if i else ''}.png")
                by_prompt[f"samples/prompt{p}"] = list(fitted)
        for (p, s), image in zip(jobs, images, strict=True):
            image.save(folder / f"prompt{p}-seed{s}.png")
            by_prompt.setdefault(f"samples/prompt{p}", []).append(image)
        if sampling["inputs"]:
            _grid([by_prompt[f"samples/prompt{p}"] for p in range(len(sampling["prompts"]))]).save(folder / "grid.png")
        if preview is not None:
            (folder / "preview").mkdir(exist_ok=True)
            for (p, s), image in zip(jobs, previews, strict=True):
                image.save(folder / "preview" / f"prompt{p}-seed{s}.png")
                by_prompt.setdefault(f"preview/prompt{p}", []).append(image)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":  # SummaryWriter.add_images wants one uint8 array, NHWC here
                arrays = {k: np.stack([np.asarray(im) for im in v]) for k, v in by_prompt.items()}
                tracker.log_images(arrays, step=step, dataformats="NHWC")
            else:
                tracker.log_images(by_prompt, step=step)
    transformer.train()


def _grid(rows: list[list]) -> Any:
    """One image of the rows side by side (an edit sample's input, then its outputs), rows stacked, on white."""
    from PIL import Image

    width = max(sum(im.width for im in row) for row in rows)
    grid = Image.new("RGB", (width, sum(max(im.height for im in row) for row in rows)), "white")
    top = 0
    for row in rows:
        left = 0
        for im in row:
            grid.paste(im, (left, top))
            left += im.width
        top += max(im.height for im in row)
    return grid


def _trackers(cfg: Config, run_dir: Path, ckpt: Path | None) -> list:
    """accelerate trackers: TensorBoard when it is installed (events in <run>/logs) and W&B when
    ``train.wandb_project`` is set (checked here, before any model loads). A resumed run is a new W&B run in the
    run folder's group: W&B drops steps at or below a run's last one, and a resume repeats the steps after its
    checkpoint."""
    trackers: list = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    project = cfg.train.wandb_project
    if not project:
        return trackers
    if importlib.util.find_spec("wandb") is None:
        raise FinetuneError(
            "train.wandb_project: logging to W&B needs the wandb package, which is not installed; run "
            "`pip install 'finetune[wandb]'`, or leave train.wandb_project empty"
        )
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    keyless = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    if not (keyless or os.environ.get("WANDB_API_KEY") or _netrc_login(host)):
        raise FinetuneError(
            f"train.wandb_project: W&B needs an API key for {host}: set WANDB_API_KEY or run `wandb login` once "
            "(WANDB_MODE=offline logs to <run>/wandb without one)"
        )
    from accelerate.tracking import WandBTracker

    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16] + (f"-{ckpt.name}" if ckpt else "")
    name = run_dir.name + (f" (from {ckpt.name})" if ckpt else "")
    config = config_to_dict(cfg)
    trackers.append(WandBTracker(project, name=name, id=run_id, group=run_dir.name, dir=str(run_dir), config=config))
    return trackers


def _netrc_login(host: str | None) -> bool:
    """Whether ~/.netrc holds a login for ``host`` (where `wandb login` stores the key)."""
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _metrics(run_dir: Path, main: bool, *rows: dict) -> None:
    """Append ``rows`` to metrics.jsonl (main process), in one write."""
    if main:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}G"  # Linux reports KiB


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _shard(transformer: torch.nn.Module) -> None:
    """FSDP2 (torch ``fully_shard``) over the processes: each repeated block is one unit, gathered whole only while it
    runs forward or backward, then the rest of the model; every parameter, frozen or LoRA, keeps a 1/N slice on each
    process. Applied by us rather than through accelerate's plugin, which only shards on accelerators: the same code
    then runs on 2 CPU processes in the tests and on GPUs."""
    from torch.distributed.fsdp import fully_shard

    for module in transformer.modules():
        if type(module).__name__ in transformer._repeated_blocks:  # FLUX's double and single blocks
            fully_shard(module)
    fully_shard(transformer)


def _save(cfg, family, run_dir, step, transformer, optimizer, scheduler, digest, main, sharded, ema) -> None:
    """Write a checkpoint (main process). Under FSDP every process calls it: the LoRA and its optimizer state are
    gathered from every shard first."""
    if not (main or sharded):
        return
    weights = lora.lora_state_dict(transformer)
    optimizer_state = checkpoint.optimizer_state(transformer, optimizer, sharded=sharded)
    if not main:
        return
    state = {  # the LoRA itself is stored once, in the checkpoint's lora.safetensors
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": checkpoint.rng_state(),
        "data_index": step * cfg.train.gradient_accumulation,  # next global micro-batch
        "dataset_digest": digest,
        "config": config_to_dict(cfg),
    }
    if ema is not None:  # train.ema: float32 on the CPU, so a resumed run continues it exactly
        state["ema"] = {k: v.to("cpu", copy=True) for k, v in ema.items()}
    write = lambda path: lora.save_lora(  # noqa: E731
        path,
        weights,
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        base_model=cfg.base_model,
        trigger_word=cfg.trigger_word,
        targets=cfg.lora.targets,
        alpha_keys=family.LORA_ALPHA_KEYS,
    )
    checkpoint.save_checkpoint(run_dir, step, state, write, dump_config(cfg))
    log.info("checkpoint %s", checkpoint.checkpoint_dir(run_dir, step))
    for old in checkpoint.prune_checkpoints(run_dir, cfg.train.keep_checkpoints):
        log.info("removed checkpoint %s (train.keep_checkpoints=%d)", old, cfg.train.keep_checkpoints)
