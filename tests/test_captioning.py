"""Captioning as the release does it: request, sampling settings, post-processing, sidecars, pipeline integration."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import fast_call, tiny_captioner, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.captioning import (
    CAPTION_REQUEST,
    Captioner,
    clean_caption,
    load_captioner,
    read_caption,
    sidecar_path,
    write_caption,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "The image features a woman in her 55s with blonde hair. She appears to be in a good mood. She wears a scarf.",
            "A woman in her 55s with blonde hair. She appears to be in a good mood.",
        ),
        (
            "The image shows AN OLD barn. It is red.",
            "An OLD barn. It is red..",
        ),  # the release's capitalize, two periods
        ("The photo depicts", "The photo depicts."),
        ("", ""),
        ("   ", ""),
        ("Cat", "Cat."),
        ("The image features a dog", "A dog."),
    ],
)
def test_release_post_processing(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_request_and_generation_settings_reach_generate(lq_image, monkeypatch) -> None:
    model, processor = tiny_captioner()
    seen = {}
    original_generate = model.generate

    def spy_generate(**kwargs):
        seen.update(kwargs)
        return original_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy_generate)
    captioner = Captioner(model, processor)
    assert (
        captioner.request
        == CAPTION_REQUEST
        == "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nDescribe this image and its style in a "
        "very detailed manner. ASSISTANT:"
    )
    captions = captioner.raw_captions([lq_image, lq_image], seed=3)
    assert (seen["do_sample"], seen["temperature"], seen["top_p"], seen["max_new_tokens"]) == (True, 0.2, 0.7, 512)
    prompt_ids = seen["input_ids"][0][seen["attention_mask"][0].bool()]
    decoded = processor.tokenizer.decode(prompt_ids)
    assert decoded.replace("<image>", "").split() == CAPTION_REQUEST.replace("<image>", "").split()
    assert "<image>" in decoded
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert captioner.raw_captions([lq_image, lq_image], seed=3) == captions  # seeded sampling is reproducible


def test_sidecar_round_trip(tmp_path) -> None:
    image = tmp_path / "photo.png"
    assert read_caption(image) is None
    path = write_caption(image, "The image features a stone bridge. Water flows. Trees.")
    assert path == sidecar_path(image) == tmp_path / "photo.json"
    assert json.loads(path.read_text()) == {"caption": "The image features a stone bridge. Water flows. Trees."}
    assert read_caption(image) == "A stone bridge. Water flows."
    write_caption(image, "The image features x", prompt="A hand-written prompt, kept as is")
    assert read_caption(image) == "A hand-written prompt, kept as is"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.json"]  # no temporary files left
    path.write_text("{not json")
    with pytest.raises(ValueError, match="photo.json.*not valid JSON"):
        read_caption(image)
    path.write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match=r'must hold \{"caption"'):
        read_caption(image)


def test_the_readme_own_words_sidecar_gives_the_words_verbatim(tmp_path) -> None:
    """The README's sidecar example for one's own words must come through unchanged, not lose three words as a raw
    LLaVA answer under "caption" does."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    examples = re.findall(r'`(\{"prompt": "[^"]+"\})`', readme)
    assert examples, "README.md shows no own-words sidecar ({\"prompt\": ...})"
    for example in examples:
        words = json.loads(example)["prompt"]
        sidecar_path(tmp_path / "photo.png").write_text(example, encoding="utf-8")
        assert read_caption(tmp_path / "photo.png") == words
    # What the README warns of: the same words under "caption" are post-processed as the release does.
    write_caption(tmp_path / "photo.png", "A red boat moored in a harbour.")
    assert read_caption(tmp_path / "photo.png") == "Moored in a harbour.."


@pytest.fixture
def captioning_pipe() -> FaithDiffSDXLPipeline:
    model, processor = tiny_captioner()
    pipe = FaithDiffSDXLPipeline(**tiny_components(), captioner=model, captioner_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_captions_the_lq_image_when_no_prompt(captioning_pipe, lq_image, monkeypatch) -> None:
    images_seen, prompts_seen = [], []
    original_caption = Captioner.raw_captions

    def spy_raw(self, images, seed=None):
        images_seen.extend(image.size for image in images)
        return original_caption(self, images, seed)

    original_encode = captioning_pipe.encode_prompt

    def spy_encode(*args, **kwargs):
        prompts_seen.append(kwargs["prompt"])
        return original_encode(*args, **kwargs)

    monkeypatch.setattr(Captioner, "raw_captions", spy_raw)
    monkeypatch.setattr(captioning_pipe, "encode_prompt", spy_encode)
    captioning_pipe(lq_image, **fast_call(prompt=None, generator=torch.Generator().manual_seed(0)))
    assert images_seen == [lq_image.size]  # the LQ input before upscaling
    expected = captioning_pipe.caption(lq_image, torch.Generator().manual_seed(0))
    assert prompts_seen == [expected]


def test_given_prompt_is_never_altered_nor_captioned(captioning_pipe, lq_image, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(Captioner, "raw_captions", lambda self, images, seed=None: calls.append(1) or ["x"])
    prompts_seen = []
    original_encode = captioning_pipe.encode_prompt
    monkeypatch.setattr(
        captioning_pipe, "encode_prompt", lambda *a, **k: prompts_seen.append(k["prompt"]) or original_encode(*a, **k)
    )
    captioning_pipe(lq_image, **fast_call(prompt="The image features exactly this."))
    assert calls == [] and prompts_seen == [["The image features exactly this."]]


def test_captioning_does_not_advance_the_generator(captioning_pipe, lq_image) -> None:
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    first = captioning_pipe.caption(lq_image, generator)
    assert torch.equal(generator.get_state(), state)
    assert captioning_pipe.caption(lq_image, generator) == first


def test_captioner_saves_and_loads_with_the_pipeline(captioning_pipe, tmp_path) -> None:
    captioning_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["captioner"] == ["transformers", "LlavaForConditionalGeneration"]
    assert index["captioner_processor"] == ["transformers", "LlavaProcessor"]
    loaded = FaithDiffSDXLPipeline.from_pretrained(tmp_path)
    assert type(loaded.captioner).__name__ == "LlavaForConditionalGeneration"
    assert type(loaded.captioner_processor).__name__ == "LlavaProcessor"
    image = captioning_pipe.image_processor.numpy_to_pil(torch.rand(1, 20, 24, 3).numpy())[0]
    seeded = torch.Generator().manual_seed(1)
    assert loaded.caption(image, seeded) == captioning_pipe.caption(image, torch.Generator().manual_seed(1))


def test_offload_sequence_puts_the_captioner_first() -> None:
    assert FaithDiffSDXLPipeline.model_cpu_offload_seq.split("->")[0] == "captioner"


def test_no_captioner_means_a_clear_error(tiny_pipe, lq_image) -> None:
    with pytest.raises(ValueError, match="no `captioner`"):
        tiny_pipe.caption(lq_image)


def test_quantization_arguments() -> None:
    with pytest.raises(ValueError, match="`quantization` must be None or one of"):
        load_captioner("unused", quantization="3bit")


def test_quantization_without_bitsandbytes_is_a_clear_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ValueError, match="needs bitsandbytes: pip install bitsandbytes"):
        load_captioner("unused", quantization="8bit")


# LLaVA-1.5's chat template as llava-hf ships it, in behaviour: a system message's text verbatim, each user turn as
# "USER: ", images first, each text followed by a space, and "ASSISTANT:" as the generation prompt.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_chat_template_request_is_the_releases_text_word_for_word() -> None:
    model, processor = tiny_captioner()
    processor.chat_template = LLAVA_15_TEMPLATE
    assert Captioner(model, processor).request == CAPTION_REQUEST
    # A template that ignores system messages still gets the instruction.
    processor.chat_template = LLAVA_15_TEMPLATE.replace("{{ item['text'] + ' ' }}", "{% if message['role'] != 'system' %}{{ item['text'] + ' ' }}{% endif %}")
    assert Captioner(model, processor).request == "USER: <image>\nDescribe this image and its style in a very detailed manner. ASSISTANT:"
