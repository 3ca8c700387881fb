"""Eval scores: CLIP-T, CLIP-I, DINO, diversity, and paired comparisons between versions.

The math is small pure functions over embeddings (each docstring names its source). The scorers wrap real
transformers models (CLIP for CLIP-T/CLIP-I, DINO ViT-S/16 for DINO and diversity), loaded lazily from a local folder
or hub id, once per run. A model that cannot be loaded (offline, not cached, wrong path) is not an error: its metrics
are skipped and ``Scorers.notes`` says why, so everything else is still produced.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "ClipScorer",
    "DinoScorer",
    "Scorers",
    "bootstrap_ci",
    "clip_direction",
    "clip_text_score",
    "cosine_matrix",
    "diversity",
    "mean_pairwise_cosine",
    "paired_cosine",
    "paired_summary",
    "remove_trigger",
    "save_tiny_scorers",
    "win_rate",
]

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- pure math --------------------------------------------------------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairwise cosine similarities ``[N, M]`` between rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]``.

    Computed in float64 after L2 normalisation (CLIPScore, Hessel et al. 2021, eq. 1 uses the same cosine).
    """
    import torch

    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def mean_pairwise_cosine(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean of all pairwise cosines between generated and reference embeddings.

    DreamBooth's CLIP-I and DINO subject-fidelity metrics (Ruiz et al. 2023, arXiv:2208.12242, §4.1): "the average
    pairwise cosine similarity between ViT-S/16 DINO embeddings of generated and real images".
    """
    return float(cosine_matrix(generated, reference).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per row: the cosine of ``a[i]`` and ``b[i]`` (both ``[N, D]``), in float64 as ``cosine_matrix``.

    For edits each output has one target and one input, so the DreamBooth mean over all pairs
    (``mean_pairwise_cosine``) reduces to this one cosine per row.
    """
    import torch

    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a * b).sum(dim=-1).tolist()


def clip_text_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """Per-image CLIP-T: cosine of each image embedding with the text embedding of the same row.

    DreamBooth's prompt fidelity (arXiv:2208.12242 §4.1) = CLIPScore without its ``w·max(cos, 0)`` rescaling
    (Hessel et al. 2021, arXiv:2104.08718, eq. 1), so it stays on the same cosine scale as CLIP-I and DINO.
    """
    return cosine_matrix(image_embeds, text_embeds).diagonal().tolist()


def clip_direction(
    output_embeds: torch.Tensor,
    input_embeds: torch.Tensor,
    after_text_embeds: torch.Tensor,
    before_text_embeds: torch.Tensor,
) -> list[float]:
    """Per row: CLIP directional similarity, ``cos(Ê_img(out) − Ê_img(in), Ê_txt(after) − Ê_txt(before))``.

    How far the edit moved the image in the direction the text moved. Defined with before/after captions by
    InstructPix2Pix (Brooks et al. 2023, arXiv:2211.09800, §4 "directional CLIP similarity", after StyleGAN-NADA's
    directional loss, Gal et al. 2022, arXiv:2108.00946, eq. 3); as in InstructPix2Pix's ``metrics/clip_similarity.py``
    every embedding is L2-normalised before the differences are taken. All four arguments are ``[N, D]``, row i one
    edit; a row whose image (or text) did not move gives 0 (``normalize`` maps a zero vector to zero), not NaN.
    """
    import torch

    def unit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.double(), dim=-1)

    image_delta = unit(unit(output_embeds) - unit(input_embeds))
    text_delta = unit(unit(after_text_embeds) - unit(before_text_embeds))
    return (image_delta * text_delta).sum(dim=-1).tolist()


def diversity(embeds: torch.Tensor) -> float | None:
    """``1 - mean`` off-diagonal pairwise cosine among the embeddings of one prompt's seeds; None below 2 images.

    DreamBooth's DIV uses LPIPS between same-prompt images (arXiv:2208.12242 §4.3); we use DINO cosine instead, so a
    LoRA that memorises its training images (every seed the same picture) scores near 0.
    """
    n = embeds.shape[0]
    if n < 2:
        return None
    sims = cosine_matrix(embeds, embeds)
    off_diagonal = (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))
    return 1.0 - float(off_diagonal)


def remove_trigger(text: str, trigger: str) -> str:
    """The prompt with the trigger word removed (whole word, any case) and spaces collapsed, for CLIP-T.

    CLIP has never seen a made-up trigger token; leaving it in scores the token, not the prompt (DreamBooth scores
    prompts with the identifier removed, arXiv:2208.12242 §4.1).
    """
    if not trigger:
        return text
    stripped = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", " ", text, flags=re.IGNORECASE)
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", stripped)).strip()


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean with a percentile-bootstrap confidence interval.

    Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), §13.3: resample the values with replacement,
    take the ``(1-c)/2`` and ``(1+c)/2`` quantiles of the resampled means. Seeded, so a report is reproducible.
    One value gives a zero-width interval.
    """
    import numpy as np

    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return mean, min(float(low), mean), max(float(high), mean)


def win_rate(values: Sequence[float], reference: Sequence[float], *, higher_is_better: bool = True) -> float:
    """Fraction of paired items where ``values`` beats ``reference``; a tie counts one half.

    The paired win rate of a sign test (Conover, *Practical Nonparametric Statistics*, 3rd ed., §3.4): items are
    matched by prompt and seed, so each pair saw the same prompt and the same starting noise.
    """
    if len(values) != len(reference):
        raise ValueError(f"win_rate needs paired values, got {len(values)} and {len(reference)}")
    if not values:
        raise ValueError("win_rate needs at least one pair")
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(1.0 if sign * (a - b) > 0 else 0.5 if a == b else 0.0 for a, b in zip(values, reference, strict=True))
    return wins / len(values)


def paired_summary(
    scores: dict[Any, float], reference: dict[Any, float] | None, *, higher_is_better: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Mean with bootstrap 95% CI of ``scores`` (item key → value), and the win rate on items shared with
    ``reference`` (None for the reference itself or when no item is shared)."""
    keys = sorted(scores, key=repr)
    mean, low, high = bootstrap_ci([scores[k] for k in keys], seed=seed)
    summary: dict[str, Any] = {"mean": mean, "ci95": [low, high], "n": len(keys), "win_rate": None}
    if reference is not None:
        shared = [k for k in keys if k in reference]
        if shared:
            summary["win_rate"] = win_rate(
                [scores[k] for k in shared], [reference[k] for k in shared], higher_is_better=higher_is_better
            )
            summary["pairs"] = len(shared)
    return summary


# ---- scorers ----------------------------------------------------------------------------------------------------


def _load(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` cache-first: a cached hub model loads without touching the network (whose retries
    take ~30 s when it is unreachable); only an uncached one is fetched."""
    from transformers.utils import logging as hf_logging

    from finetune.models.common import quiet_progress

    # transformers warns on every processor load that torchvision is absent and it falls back to its PIL backend,
    # which is the backend we want: keep the console to what the user can act on.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with quiet_progress():  # no "Loading weights" bar for a scorer read from disk; a download keeps its bars
            return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        if Path(name).expanduser().exists():
            raise
        return loader.from_pretrained(name, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def _features(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected tensor; 5.x wraps it in an output whose pooler_output holds it.
    return output if hasattr(output, "dim") else output.pooler_output


class ClipScorer:
    """CLIP image/text embeddings with the model's own processor (CLIP-T and CLIP-I)."""

    def __init__(self, name_or_path: str, *, device: str | torch.device = "cpu"):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.name = str(name_or_path)
        self.device = torch.device(device)
        self.model = _load(CLIPModel, self.name).to(self.device).eval()
        self.processor = _load(AutoProcessor, self.name)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = [im.convert("RGB") for im in images[start : start + batch_size]]
                inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
                chunks.append(_features(self.model.get_image_features(**inputs)).float().cpu())
        return torch.cat(chunks)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        # CLIP sees at most 77 tokens; longer prompts are truncated (torchmetrics warns about the same limit).
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        with torch.inference_mode():
            return _features(self.model.get_text_features(**inputs)).float().cpu()


class DinoScorer:
    """DINO ViT CLS-token embeddings with DINO's evaluation transform (DINO and diversity).

    Preprocessing is DINO's own eval transform, ``Resize(256, bicubic) → CenterCrop(224) → Normalize`` scaled to the
    model's input size (facebookresearch/dino ``eval_linear.py``); HF's default ViT processor squashes the image to a
    square and did not reproduce DreamBooth's numbers (google/dreambooth#3). Mean/std come from the model's processor
    config when it has one, else ImageNet's.
    """

    def __init__(self, name_or_path: str, *, device: str | torch.device = "cpu"):
        import torch
        from transformers import AutoImageProcessor, ViTModel

        self.name = str(name_or_path)
        self.device = torch.device(device)
        self.model = _load(ViTModel, self.name, add_pooling_layer=False).to(self.device).eval()
        try:
            processor = _load(AutoImageProcessor, self.name)
            self.mean = tuple(processor.image_mean)
            self.std = tuple(processor.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.crop = int(self.model.config.image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """``[3, crop, crop]``: shorter side to ``crop·256/224`` (bicubic), centre crop, normalise."""
        import numpy as np
        import torch
        from PIL import Image as PILImage

        image = image.convert("RGB")
        short = round(self.crop * 256 / 224)
        w, h = image.size
        scale = short / min(w, h)
        image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), PILImage.BICUBIC)
        w, h = image.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = torch.stack([self.preprocess(im) for im in images[start : start + batch_size]])
                hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state
                chunks.append(hidden[:, 0].float().cpu())  # CLS token
        return torch.cat(chunks)


class Scorers:
    """The run's scorers, each loaded on first use and at most once; a load failure becomes a note.

    ``seconds`` accumulates the time spent loading and running scorers, so callers can report it apart.
    """

    def __init__(self, clip_model: str | Path | None, dino_model: str | Path | None, *, device: Any = "cpu"):
        self.names = {"clip": str(clip_model) if clip_model else None, "dino": str(dino_model) if dino_model else None}
        self.device = device
        self.notes: list[str] = []
        self.seconds = 0.0
        self._loaded: dict[str, ClipScorer | DinoScorer | None] = {}

    def _get(self, kind: str) -> ClipScorer | DinoScorer | None:
        if kind in self._loaded:
            return self._loaded[kind]
        name = self.names[kind]
        scorer = None
        if name is None:
            self.notes.append(f"{kind.upper()} metrics skipped: no {kind} model given.")
        else:
            start = time.perf_counter()
            what = "CLIP-T and CLIP-I" if kind == "clip" else "DINO and diversity"
            hint = f"Pass a local folder with --{kind}-model, or download it once with network access."
            try:
                if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
                    raise FileNotFoundError(f"no folder {name}")
                scorer = (ClipScorer if kind == "clip" else DinoScorer)(name, device=self.device)
            except Exception as e:  # any load failure (offline, not cached, bad files) skips the metric, not the run
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                cause = f"{type(e).__name__}: {reason[:200]}"
                self.notes.append(f"{what} skipped: could not load {kind} model '{name}' ({cause}). {hint}")
                log.warning(self.notes[-1])
            self.seconds += time.perf_counter() - start
        self._loaded[kind] = scorer
        return scorer

    @property
    def clip(self) -> ClipScorer | None:
        return self._get("clip")

    @property
    def dino(self) -> DinoScorer | None:
        return self._get("dino")

    def model_name(self, kind: str) -> str | None:
        """The model id/path actually used for ``kind``, or None when it is skipped (loads it if needed)."""
        return self.names[kind] if self._get(kind) is not None else None

    def timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` and add its wall time to ``seconds``."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def save_tiny_scorers(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny random-weight CLIP (model, tokenizer, processor) and DINO-style ViT; returns their folders.

    For tests, benchmarks and the demo: ``Scorers(clip_dir, dino_dir)`` then runs the real loading and scoring code
    with no download. Scores from random weights mean nothing beyond the math.
    """
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig, ViTModel

    from finetune.models.common import quiet_progress

    try:  # the PIL processors by name: the plain names need torchvision and print a notice as they fall back to these
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:  # transformers before the torchvision/PIL split, where the plain names are the PIL ones
        from transformers import CLIPImageProcessor, ViTImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Character-level byte-pair vocabulary without merges: every word still tokenizes.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )  # fmt: skip
    clip_dir, dino_dir = folder / "clip", folder / "dino"
    with torch.random.fork_rng(devices=[]), quiet_progress():  # no "Writing model shards" bars
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(clip_dir)
        ViTModel(ViTConfig(image_size=32, patch_size=8, **tower), add_pooling_layer=False).save_pretrained(dino_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    ).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def prediction_change(
    base_model: str, lora_file: str | Path, captions: list[str], *, px: int = 32, max_sequence_length: int = 16
) -> float:
    """How much an all-linear LoRA changes the model where it should not: the mean squared difference of the
    transformer's velocity with and without it on ``captions`` (e.g. class-word prompts), for random images, noise
    and σ = 0.5 drawn from seed 0, through the family interface. The measure of train.preservation (issue 16): a
    preserved LoRA leaves the class prompts closer to the base model. Rank and alpha come from the file."""
    import torch

    from finetune import flow, lora, models

    family = models.family_for(base_model)
    c = family.load_components(base_model, parts=("transformer", "vae", *family.TEXT_PARTS))
    seq = family.max_sequence_length(base_model, max_sequence_length)
    with torch.no_grad():
        text = family.encode_prompts(c, captions, seq)
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand((len(captions), 3, px, px), generator=g) * 2 - 1
        latents = family.normalize_latents(family.encode_images(c.vae, pixels)[0], c.vae)
        sigmas = torch.full((len(captions),), 0.5)
        noisy = flow.add_noise(latents, torch.randn(latents.shape, generator=g), sigmas)
        call = (sigmas, text, family.image_ids(latents.shape[1:], "cpu", torch.float32))
        call += (family.text_ids(seq, "cpu", torch.float32),)
        call += (1.0 if getattr(c.transformer.config, "guidance_embeds", False) else None,)
        before = family.predict(c.transformer, noisy, *call)
        weights, metadata = lora.load_lora_file(lora_file)
        rank, alpha = lora.lora_file_settings(weights, metadata)
        lora.add_lora(c.transformer, rank=rank, alpha=alpha, targets="all-linear")
        lora.set_lora_state(c.transformer, weights)
        after = family.predict(c.transformer, noisy, *call)
    return (after - before).pow(2).mean().item()
