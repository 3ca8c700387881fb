"""Generated image fixtures for the prepare tests: every case is written on the fly, no binaries live in git.

Images are smooth random fields (a few random pixels upscaled bicubically), so distinct seeds give distinct
perceptual hashes and re-encodings of one seed stay within a few bits, like real photos.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "PAIR_INSTRUCTIONS",
    "SWAPPED_RG_DESCRIPTION",
    "asymmetric",
    "bomb_png",
    "build_kitchen_sink",
    "pair_images",
    "rotated_jpeg",
    "smooth",
    "swapped_rg_icc",
    "write_pair_dataset",
    "write_pair_layouts",
    "write_tiny_blip",
    "zip_bomb",
]


def smooth(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A deterministic photo-like RGB image (low-frequency random colors)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def asymmetric(size: tuple[int, int] = (400, 300)) -> Image.Image:
    """Red left half, blue right half, green top-left quarter marker: every rotation and flip is distinguishable."""
    w, h = size
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, w // 2, h))
    im.paste((0, 255, 0), (0, 0, w // 4, h // 4))
    return im


def _jpeg_with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def rotated_jpeg(im: Image.Image, orientation: int = 6) -> bytes:
    """JPEG bytes of ``im`` stored sideways, with an EXIF Orientation tag that says how to show it upright."""
    return _jpeg_with_orientation(im, orientation)


def bomb_png(side: int = 30000) -> bytes:
    """A few hundred bytes of PNG whose header claims side x side pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def zip_bomb(path: Path, megabytes: int = 20) -> Path:
    """A zip with one member of zeros that deflates ~1000:1."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photos/huge.png", b"\0" * (megabytes << 20))
    return path


SWAPPED_RG_DESCRIPTION = "Swapped RG test profile"


def swapped_rg_icc() -> bytes:
    """A minimal ICC v2 RGB matrix/TRC profile whose red and green colorants are sRGB's green and red.

    Written by hand after ICC.1:2001-04 (header, tag table, XYZType, curveType, textDescriptionType): an image
    tagged with it shows pure red where the pixels say pure green, so a correct sRGB conversion swaps them.
    """

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", int(2.2 * 256)) + b"\0\0"
    text = SWAPPED_RG_DESCRIPTION.encode() + b"\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67
    srgb_d50 = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(*srgb_d50["g"])),
        (b"gXYZ", xyz(*srgb_d50["r"])),
        (b"bXYZ", xyz(*srgb_d50["b"])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for sig, payload in tags:
        payload += b"\0" * (-len(payload) % 4)
        table += sig + struct.pack(">II", offset + len(blob), len(payload))
        blob += payload
    size = offset + len(blob)
    header = (
        struct.pack(">I", size)
        + b"\0" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 0)
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + blob


def build_kitchen_sink(root: Path) -> dict[str, str]:
    """Write one folder holding every case of issue 2 section 6; returns {case: source label in the report}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "__MACOSX").mkdir()
    cases = {}

    def label(rel: str, case: str) -> None:
        cases[case] = f"{root.name}/{rel}"

    (root / "rotated.jpg").write_bytes(_jpeg_with_orientation(asymmetric(), 6))
    label("rotated.jpg", "rotated")

    rgba = np.zeros((300, 400, 4), dtype=np.uint8)  # fully transparent black, except an opaque red square
    rgba[100:200, 100:200] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    label("rgba.png", "rgba")

    la = np.zeros((300, 400, 2), dtype=np.uint8)
    la[:, :200] = (0, 128)  # black at half alpha on the left; transparent on the right
    Image.fromarray(la, "LA").save(root / "la.png")
    label("la.png", "la")

    pal = Image.new("P", (400, 300), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 200, 300))  # left half index 0 = transparent
    pal.save(root / "palette.gif", transparency=0)
    label("palette.gif", "palette")

    Image.new("CMYK", (400, 300), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    label("cmyk.jpg", "cmyk")

    grey16 = np.tile(np.linspace(0, 65535, 400, dtype=np.uint16), (300, 1))
    Image.fromarray(grey16).save(root / "grey16.png")
    label("grey16.png", "grey16")

    frames = [smooth(70), smooth(71)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    label("animated.gif", "animated")

    icc_img = smooth(90)
    icc_img.paste((0, 255, 0), (0, 0, 100, 100))  # pure green in the file = pure red on screen
    icc_img.save(root / "p3ish.png", icc_profile=swapped_rg_icc())
    label("p3ish.png", "icc")

    good = io.BytesIO()
    smooth(80).save(good, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    label("truncated.jpg", "truncated")
    (root / "empty.jpg").write_bytes(b"")
    label("empty.jpg", "empty")
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    label("notes.jpg", "text_as_jpg")
    (root / "bomb.png").write_bytes(bomb_png())
    label("bomb.png", "bomb")
    smooth(81, (120, 90)).save(root / "tiny.png")
    label("tiny.png", "tiny")

    smooth(1).save(root / "dup_a.png")
    smooth(1).save(root / "nested" / "dup_b.bmp")  # same pixels, other format and folder
    label("dup_a.png", "exact_kept")
    label("nested/dup_b.bmp", "exact_dup")
    smooth(2, (800, 600)).save(root / "near_big.jpg", quality=95)
    smooth(2, (800, 600)).resize((400, 300), Image.Resampling.LANCZOS).save(root / "near_small.jpg", quality=80)
    label("near_big.jpg", "near_kept")
    label("near_small.jpg", "near_dup")

    smooth(3).save(root / "nested" / "deeper" / "deep.png")
    label("nested/deeper/deep.png", "nested")
    smooth(4).save(root / "UPPER.JPG", quality=95)
    (root / "UPPER.TXT").write_text("uppercase caption with TOK inside", encoding="utf-8")
    label("UPPER.JPG", "upper")
    smooth(5).save(root / "bom.png")
    (root / "bom.txt").write_bytes("\ufeffcaption with a BOM\r\nsecond line".encode())
    label("bom.png", "bom")
    smooth(6).save(root / "photo.jpg", quality=95)
    (root / "photo.jpg.txt").write_text("the double extension caption", encoding="utf-8")
    label("photo.jpg", "double_ext")
    smooth(7).save(root / "kohya.png")
    (root / "kohya.caption").write_text("a [trigger] kohya caption", encoding="utf-8")
    label("kohya.png", "dot_caption")
    smooth(8).save(root / "nocaption.png")
    label("nocaption.png", "missing_caption")
    smooth(9).save(root / "nested" / "meta.png")
    (root / "nested" / "metadata.jsonl").write_text(
        '{"file_name": "meta.png", "text": "from metadata {trigger} here"}\n', encoding="utf-8"
    )
    label("nested/meta.png", "metadata")

    (root / "__MACOSX" / "._rotated.jpg").write_bytes(b"\0\5\26\7junk")
    (root / "._photo.jpg").write_bytes(b"\0\5\26\7junk")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "readme.pdf").write_bytes(b"%PDF-1.4\n")
    return cases


def write_tiny_blip(folder: Path) -> Path:
    """Save a tiny random-weight BLIP captioner (model, image processor, WordPiece tokenizer) to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    words = "a photo of the dog cat man woman on in with red blue green sitting standing beach street".split()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {t: i for i, t in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            encoder_hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            bos_token_id=vocab["[DEC]"],
            sep_token_id=vocab["[SEP]"],
            eos_token_id=vocab["[SEP]"],
            pad_token_id=vocab["[PAD]"],
        ),
        vision_config=dict(
            hidden_size=32,
            image_size=32,
            patch_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        ),
        projection_dim=32,
    )
    processor = BlipProcessor(image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


PAIR_INSTRUCTIONS = ("make it brighter", "turn the sky purple", "add a red border")


def pair_images(index: int, references: int = 1) -> tuple[Image.Image, list[Image.Image]]:
    """The target and references of edit pair ``index``: distinct smooth images, so no two collide as duplicates."""
    return smooth(500 + index, (360, 300)), [smooth(600 + 10 * index + j, (360, 300)) for j in range(references)]


def write_pair_layouts(root: Path, count: int = 3, references: int = 1) -> dict[str, Path | list[Path]]:
    """The same ``count`` edit pairs (PNG), each with its instruction, in two folder layouts under ``root``.

    ``start-end``: Replicate/fal names ``pair{i}_start.png`` (``pair{i}_start_2.png``, ...), ``pair{i}_end.png``,
    ``pair{i}.txt``. ``control``: ai-toolkit/musubi ``targets/pair{i}.png`` + ``targets/pair{i}.txt`` and
    ``control_{j}/pair{i}.png``. Returns {"start-end": folder, "control": targets folder, "controls": [folders]}.
    """
    start_end, targets = root / "start_end", root / "targets"
    controls = [root / f"control_{j + 1}" for j in range(references)]
    for folder in (start_end, targets, *controls):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        target, refs = pair_images(i, references)
        instruction = PAIR_INSTRUCTIONS[i % len(PAIR_INSTRUCTIONS)]
        target.save(start_end / f"pair{i}_end.png")
        target.save(targets / f"pair{i}.png")
        for j, ref in enumerate(refs):
            ref.save(start_end / f"pair{i}_start{'' if j == 0 else f'_{j + 1}'}.png")
            ref.save(controls[j] / f"pair{i}.png")
        (start_end / f"pair{i}.txt").write_text(instruction, encoding="utf-8")
        (targets / f"pair{i}.txt").write_text(instruction, encoding="utf-8")
    return {"start-end": start_end, "control": targets, "controls": controls}


def write_pair_dataset(folder: Path, count: int = 3, references: int = 1) -> Path:
    """The pairs of :func:`write_pair_layouts` as a datasets ``save_to_disk`` folder, with columns named as hub edit
    datasets often name them: ``edited_image`` (target), ``input_image``, ``input_image_2``, ... (references) and
    ``edit_prompt`` (the instruction)."""
    import datasets

    columns: dict[str, list] = {"edited_image": [], "edit_prompt": []}
    ref_columns = ["input_image"] + [f"input_image_{j + 1}" for j in range(1, references)]
    for name in ref_columns:
        columns[name] = []
    for i in range(count):
        target, refs = pair_images(i, references)
        columns["edited_image"].append(target)
        columns["edit_prompt"].append(PAIR_INSTRUCTIONS[i % len(PAIR_INSTRUCTIONS)])
        for name, ref in zip(ref_columns, refs, strict=True):
            columns[name].append(ref)
    features = datasets.Features(
        {"edited_image": datasets.Image(), "edit_prompt": datasets.Value("string")}
        | {name: datasets.Image() for name in ref_columns}
    )
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder))
    return folder
