"""Captions: one clean line, the trigger word exactly once, common-word triggers, and autocaptioning."""

from __future__ import annotations

import re

from PIL import Image

from finetune.errors import EXIT_USAGE, FinetuneError

__all__ = ["Captioner", "apply_trigger", "clean_caption", "common_word_in"]

# A trigger that is a common word bleeds into every prompt using that word (kohya-ss/sd-scripts#1045).
COMMON_WORDS = frozenset(
    """a about after all also an and any art as at back be because but by can cat car come could day dog do even
    face first for from get girl give go good guy have he her him his house how i if in into it its just know lady
    like look make man me most my new no not now of on one only or other our out over painting people person photo
    picture portrait say see she so some style take than that the their them then there these they think this time
    to tree up us use want way we well what when which who will with woman work would year you your baby boy child
    city red blue green black white light dark sky sun water fire flower bird horse house room street car art
    anime cartoon drawing sketch model star king queen love life world home book""".split()
)


def clean_caption(text: str) -> str:
    """One line: BOMs dropped, runs of whitespace and newlines collapsed to one space."""
    return " ".join(text.replace("\ufeff", "").split())


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def apply_trigger(caption: str, trigger: str) -> str:
    """Replace ``[trigger]``/``{trigger}`` with the trigger word; prefix it once if the caption still lacks it."""
    text = clean_caption(caption.replace("[trigger]", trigger).replace("{trigger}", trigger))
    if _has_word(text, trigger):
        return text
    return f"{trigger}, {text}" if text else trigger


def common_word_in(trigger: str) -> str | None:
    """The first word of ``trigger`` that is a common English word, if any."""
    return next((w for w in re.findall(r"\w+", trigger.lower()) if w in COMMON_WORDS), None)


_BOILERPLATE = re.compile(r"^(the image (shows|depicts|features)|this image (shows|depicts)|arafed|there is)\s+", re.I)


class Captioner:
    """An image-to-text model from transformers (local folder or hub id) that writes one-line captions.

    Models with a chat template (Florence-2, Qwen-VL, LLaVA) get ``prompt``; plain captioners (BLIP, GIT) get the
    image alone. Raises FinetuneError (exit code 2) when the model cannot be loaded.
    """

    def __init__(self, model: str, *, prompt: str = "Describe this image in one sentence.", max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = model
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model).eval()
            import torch

            if torch.cuda.is_available():
                self.model.to("cuda")
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise FinetuneError(
                f"--autocaption model {model!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Pass a local folder written by save_pretrained or the hub id of an image-to-text model, e.g. "
                "Salesforce/blip-image-captioning-large",
                EXIT_USAGE,
            ) from None
        self.chat = bool(getattr(self.processor, "chat_template", None))

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """Captions for a batch of RGB images, cleaned of boilerplate openers such as 'the image shows'."""
        import torch

        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.chat:
            out = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_BOILERPLATE.sub("", clean_caption(t)) for t in texts]
