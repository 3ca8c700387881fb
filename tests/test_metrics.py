"""Eval math on controlled inputs, through tiny CLIP and ViT models loaded from disk by the real scorer code."""

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import metrics


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def scorers(tiny_scorer_dirs):
    clip_dir, dino_dir = tiny_scorer_dirs
    return metrics.Scorers(clip_dir, dino_dir)


def test_identical_images_score_one(scorers):
    img = _image(0)
    for scorer in (scorers.clip, scorers.dino):
        gen = scorer.embed_images([img])
        ref = scorer.embed_images([img.copy(), img.copy()])
        assert metrics.mean_pairwise_cosine(gen, ref) == pytest.approx(1.0, abs=1e-6)
    assert metrics.diversity(scorers.dino.embed_images([img, img.copy(), img.copy()])) == pytest.approx(0.0, abs=1e-6)


def test_permuting_images_leaves_the_mean_unchanged(scorers):
    generated = [_image(s) for s in range(5)]
    reference = [_image(s) for s in range(10, 13)]
    for scorer in (scorers.clip, scorers.dino):
        before = metrics.mean_pairwise_cosine(scorer.embed_images(generated), scorer.embed_images(reference))
        after = metrics.mean_pairwise_cosine(
            scorer.embed_images(generated[::-1], batch_size=2), scorer.embed_images([reference[i] for i in (2, 0, 1)])
        )
        assert after == pytest.approx(before, abs=1e-6)
    before = metrics.diversity(scorers.dino.embed_images(generated))
    assert metrics.diversity(scorers.dino.embed_images(generated[1:] + generated[:1])) == pytest.approx(
        before, abs=1e-6
    )


def test_a_near_copy_is_closer_than_an_unrelated_image(scorers):
    anchor = _image(1, (64, 64))
    pixels = np.asarray(anchor).astype(np.int16) + np.random.default_rng(2).integers(-6, 7, (64, 64, 3))
    near = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    far = Image.fromarray(255 - np.asarray(anchor)).rotate(90)
    for scorer in (scorers.clip, scorers.dino):
        a, n, f = scorer.embed_images([anchor, near, far])
        assert metrics.mean_pairwise_cosine(n[None], a[None]) > metrics.mean_pairwise_cosine(f[None], a[None])


def test_math_on_hand_made_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert metrics.cosine_matrix(a, b).flatten().tolist() == pytest.approx([1.0, 2**-0.5, 0.0, 2**-0.5])
    assert metrics.mean_pairwise_cosine(a, b) == pytest.approx((1 + 2 * 2**-0.5) / 4)
    assert metrics.clip_text_score(a, b) == pytest.approx([1.0, 2**-0.5])
    assert metrics.diversity(a) == pytest.approx(1.0)  # orthogonal seeds: fully diverse
    assert metrics.diversity(a[:1]) is None


def test_clip_text_scores_rank_the_matching_prompt_first(scorers):
    texts = ["a photo of a dog", "zzzz 9999 ,,,,"]
    text_embeds = scorers.clip.embed_texts(texts)
    scores = metrics.clip_text_score(text_embeds, text_embeds)
    assert scores == pytest.approx([1.0, 1.0], abs=1e-6)
    assert metrics.cosine_matrix(text_embeds[:1], text_embeds[1:]).item() < 1.0 - 1e-4


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = rng.normal(0.3, 0.05, 8).tolist()
    mean, low, high = metrics.bootstrap_ci(small)
    assert mean == pytest.approx(float(np.mean(small)))
    assert low < mean < high
    _, low_big, high_big = metrics.bootstrap_ci(rng.normal(0.3, 0.05, 800).tolist())
    assert high_big - low_big < high - low
    assert metrics.bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    assert metrics.bootstrap_ci(small) == (mean, low, high)  # seeded: reproducible


def test_win_rate_is_paired_and_counts_ties_half():
    assert metrics.win_rate([0.9, 0.1, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.5)
    assert metrics.win_rate([0.9, 0.1, 0.5], [0.2, 0.3, 0.5], higher_is_better=False) == pytest.approx(0.5)
    assert metrics.win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        metrics.win_rate([1.0], [1.0, 2.0])
    summary = metrics.paired_summary({("p", 1): 0.8, ("p", 2): 0.6, ("q", 1): 0.7}, {("p", 1): 0.5, ("p", 2): 0.9})
    assert summary["n"] == 3 and summary["pairs"] == 2 and summary["win_rate"] == 0.5
    assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert metrics.paired_summary({"a": 1.0}, None)["win_rate"] is None


def test_remove_trigger_drops_the_word_only():
    assert metrics.remove_trigger("a photo of TOK, on a beach", "TOK") == "a photo of, on a beach"
    assert metrics.remove_trigger("tok tokyo TOK", "TOK") == "tokyo"
    assert metrics.remove_trigger("a photo of ohwx", "") == "a photo of ohwx"


def test_a_model_that_cannot_load_is_skipped_with_a_note(tmp_path, tiny_scorer_dirs):
    scorers = metrics.Scorers(tmp_path / "no-such-clip", tiny_scorer_dirs[1])
    assert scorers.clip is None
    assert scorers.clip is None  # tried once, not again
    assert scorers.dino is not None
    assert len(scorers.notes) == 1 and "no-such-clip" in scorers.notes[0] and "CLIP-T" in scorers.notes[0]
    assert scorers.model_name("clip") is None and scorers.model_name("dino") == str(tiny_scorer_dirs[1])


def test_saving_and_loading_scorers_draws_no_library_progress_bar(tmp_path, capfd):
    """save_tiny_scorers and the scorers' loads from disk print nothing (no "Writing model shards" / "Loading
    weights" bars), and leave transformers' and huggingface_hub's progress settings as they found them."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled())
    clip_dir, dino_dir = metrics.save_tiny_scorers(tmp_path)
    scorers = metrics.Scorers(clip_dir, dino_dir)
    assert scorers.clip is not None and scorers.dino is not None, scorers.notes
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    assert (hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()) == before


def test_clip_direction_on_hand_made_embeddings():
    """cos(Ê(out) − Ê(in), Ê(after) − Ê(before)) with unit embeddings whose answer is known by hand."""

    def t(*rows):
        return torch.tensor(rows, dtype=torch.float32)

    e = torch.eye(4)
    before, after = e[[0]], e[[1]]  # the text moves from axis 0 to axis 1
    # the image moved exactly as the text did: 1; the edit undone (input and output swapped): -1
    assert metrics.clip_direction(e[[1]], e[[0]], after, before) == pytest.approx([1.0])
    assert metrics.clip_direction(e[[0]], e[[1]], after, before) == pytest.approx([-1.0])
    # a move between axes the text did not touch: 0; half along the text's direction: 1/2
    assert metrics.clip_direction(e[[3]], e[[2]], after, before) == pytest.approx([0.0])
    assert metrics.clip_direction(e[[2]], e[[0]], after, before) == pytest.approx([0.5])
    # embeddings are normalised first (InstructPix2Pix): scaling any of them changes nothing
    out, inp, text = t([0.6, 0.8, 0.0, 0.0]), t([1.0, 0.0, 0.0, 0.0]), t([0.0, 0.6, 0.8, 0.0])
    plain = metrics.clip_direction(out, inp, text, before)
    assert metrics.clip_direction(7 * out, 0.5 * inp, 3 * text, 2 * before) == pytest.approx(plain)
    expected = (np.array([-0.4, 0.8, 0, 0]) / np.sqrt(0.8)) @ (np.array([-1.0, 0.6, 0.8, 0]) / np.sqrt(2))
    assert plain == pytest.approx([expected])
    # an unchanged image scores 0, not NaN; rows are independent
    rows = metrics.clip_direction(torch.cat([inp, out]), torch.cat([inp] * 2), torch.cat([text] * 2), e[[0, 0]])
    assert rows[0] == 0.0 and rows[1] == pytest.approx(plain[0])


def test_paired_cosine_is_the_row_wise_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    assert metrics.paired_cosine(a, b) == pytest.approx([0.0, 1.0, -1.0])
    assert metrics.paired_cosine(a, b) == pytest.approx(metrics.cosine_matrix(a, b).diagonal().tolist())
