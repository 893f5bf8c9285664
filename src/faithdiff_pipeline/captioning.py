"""Captioning the LQ image as the FaithDiff release does (LLaVA-1.5, its request, sampling and post-processing), and
the JSON caption sidecars that let a large job caption once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import torch

from .atomic_files import write_text_atomic

INSTRUCTION = "Describe this image and its style in a very detailed manner."
# The system sentence of LLaVA's vicuna_v1 conversation, which the release's request starts with.
SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The release's request, word for word; used as is when the processor brings no chat template of its own.
CAPTION_REQUEST = f"{SYSTEM_MESSAGE} USER: <image>\n{INSTRUCTION} ASSISTANT:"
RELEASE_GENERATION = {"do_sample": True, "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 512}
RELEASE_CAPTIONER = "llava-hf/llava-1.5-13b-hf"
QUANTIZATIONS = ("8bit", "4bit")


def clean_caption(text: str) -> str:
    """The release's post-processing of a LLaVA answer: drop the first three words ("The image features ..."),
    capitalise the new first word (``str.capitalize``, as the release), keep the first two sentences (split on
    ``". "``) and append ``"."``. A caption of three words or fewer keeps its words; an empty one stays empty.

    It is applied exactly as in the release, so an answer whose second sentence already ends the text keeps both
    periods (``"A. B."`` -> ``"A. B.."``): restoring with the release's prompts reproduces the release.
    """
    words = text.split()
    if len(words) > 3:
        words = words[3:]
    if not words:
        return ""
    words[0] = words[0].capitalize()
    sentences = " ".join(words).split(". ")
    return ". ".join(sentences[:2]) + "."


def sidecar_path(image_path: str | os.PathLike) -> Path:
    """The caption sidecar of an image: ``photo.jpg`` -> ``photo.json`` in the same folder (the release's layout)."""
    return Path(image_path).with_suffix(".json")


def read_caption(image_path: str | os.PathLike) -> str | None:
    """The prompt stored beside ``image_path``, or ``None`` when it has no sidecar (see :func:`prompt_from_sidecar`).
    A sidecar that cannot be read or parsed raises ``ValueError`` naming it."""
    path = sidecar_path(image_path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Caption sidecar {str(path)!r} is not readable: {error}") from error
    return prompt_from_sidecar(text, str(path))


def prompt_from_sidecar(text: str, where: str) -> str:
    """The prompt a sidecar's JSON ``text`` holds; ``where`` names the sidecar in errors.

    A sidecar holds ``{"caption": RAW_LLAVA_ANSWER}`` (the release's format; the post-processing is applied on reading,
    as the release does: its first three words are dropped) and optionally ``{"prompt": TEXT}``, which is used
    verbatim: write your own words, or correct a caption, under ``"prompt"``.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Caption sidecar {where!r} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("prompt", data.get("caption")), str):
        raise ValueError(f'Caption sidecar {where!r} must hold {{"caption": "..."}} or {{"prompt": "..."}}, got '
                         f"{str(data)[:80]!r}.")
    return data["prompt"] if isinstance(data.get("prompt"), str) else clean_caption(data["caption"])


def write_caption(image_path: str | os.PathLike, caption: str, prompt: str | None = None) -> Path:
    """Writes the sidecar of ``image_path`` (the raw ``caption``, and ``prompt`` if given) atomically."""
    path = sidecar_path(image_path)
    data = {"caption": caption} if prompt is None else {"caption": caption, "prompt": prompt}
    write_text_atomic(path, json.dumps(data, ensure_ascii=False))
    return path


class Captioner:
    """Captions images with an image-text-to-text model of transformers, as the release does with LLaVA-1.5.

    Args:
        model: e.g. ``LlavaForConditionalGeneration``; any model whose ``generate`` takes the processor's output.
        processor: its ``AutoProcessor``. With a chat template, the release's instruction goes through it; without,
            the LLaVA-1.5 request ``CAPTION_REQUEST`` is used as is.
        generation: ``generate`` settings; the release samples with temperature 0.2, top_p 0.7, up to 512 tokens.
    """

    def __init__(self, model: Any, processor: Any, **generation: Any) -> None:
        self.model = model
        self.processor = processor
        self.generation = {**RELEASE_GENERATION, **generation}

    @property
    def request(self) -> str:
        """The text sent with each image: the release's, through the processor's chat template where it has one.

        LLaVA-1.5's template renders a system message verbatim before ``USER:``, which gives the release's text
        exactly; a template that drops system messages gets the request without it."""
        if not getattr(self.processor, "chat_template", None):
            return CAPTION_REQUEST
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}
        system = {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]}
        rendered = self.processor.apply_chat_template([system, user], add_generation_prompt=True)
        if SYSTEM_MESSAGE in rendered:
            return rendered
        return self.processor.apply_chat_template([user], add_generation_prompt=True)

    @torch.no_grad()
    def raw_captions(self, images: Sequence[PIL.Image.Image], seed: int | None = None) -> list[str]:
        """The model's answers, unprocessed. ``seed`` makes the sampling reproducible without touching the caller's
        global random state."""
        images = [image.convert("RGB") for image in images]
        inputs = self.processor(text=[self.request] * len(images), images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(**inputs, **self.generation)
        answers = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(answers, skip_special_tokens=True)]

    def caption(self, images: Sequence[PIL.Image.Image], seed: int | None = None) -> list[str]:
        """Prompts for ``images``: the answers after the release's post-processing."""
        return [clean_caption(text) for text in self.raw_captions(images, seed)]


def caption_lq_images(
    model: Any, processor: Any, image: Any, generator: torch.Generator | list[torch.Generator] | None = None
) -> list[str]:
    """Prompts for LQ pipeline inputs (``image``: one or a batch, in any form the pipeline takes, before upscaling),
    written by ``model`` as the release does (see :class:`Captioner`). The sampling is seeded with ``generator``'s
    initial seed (the first one's, for a list), without advancing it: ``torch.Generator().manual_seed(42)`` captions
    as ``faithdiff-upscale --seed 42`` does.

    Raises:
        ValueError: ``model`` or ``processor`` is None.
    """
    from diffusers.image_processor import VaeImageProcessor

    from .preprocessing import as_image_list, prepare_lq_images
    from .seeds import initial_seed

    if model is None or processor is None:
        raise ValueError("This pipeline has no `captioner`/`captioner_processor`; pass `prompt` or load a captioner.")
    images = [
        VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(prepare_lq_images(item, 1).reference))[0]
        for item in as_image_list(image)
    ]
    seed = initial_seed(generator[0] if isinstance(generator, list) else generator)
    return Captioner(model, processor).caption(images, seed=seed)


def load_captioner(
    model_name_or_path: str = RELEASE_CAPTIONER,
    quantization: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float16,
) -> Captioner:
    """Loads a captioner (default: the release's LLaVA-1.5-13B in transformers' format), optionally quantised to
    8 or 4 bits with bitsandbytes (``pip install bitsandbytes``; quantised models are placed on the GPU)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"`quantization` must be None or one of {QUANTIZATIONS}, got {quantization!r}.")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"`quantization={quantization!r}` needs bitsandbytes: pip install bitsandbytes"
            ) from error
        kwargs["quantization_config"] = BitsAndBytesConfig(**{f"load_in_{quantization}": True})
        kwargs["device_map"] = device or "auto"
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs).eval()
    if quantization is None and device is not None:
        model.to(device)
    return Captioner(model, AutoProcessor.from_pretrained(model_name_or_path))
