"""Tiny random FaithDiff components built in code (SDXL's structure at toy size), and the arguments of quick runs."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from faithdiff_pipeline import FaithDiffAlignmentModel, FaithDiffLQEncoder


def tiny_tokenizer() -> CLIPTokenizer:
    vocab: dict[str, int] = {}
    for code in range(33, 127):
        vocab[chr(code)] = len(vocab)
        vocab[chr(code) + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_components(seed: int = 0, with_lq_encoder: bool = True) -> dict:
    """Random components with SDXL's structure at toy size (UNet widths 32/64, VAE 32/32/64/64, text width 32+32)."""
    torch.manual_seed(seed)
    text_config = dict(
        vocab_size=190,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=188,
        eos_token_id=189,
        pad_token_id=189,
        hidden_act="gelu",
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=False,
    )
    lq_encoder = (
        FaithDiffLQEncoder(block_out_channels=(32, 32, 64, 64), layers_per_block=1) if with_lq_encoder else None
    )
    lq_encoder = lq_encoder.eval() if lq_encoder is not None else None
    alignment = FaithDiffAlignmentModel(lq_channels=64, latent_channels=32, num_attention_heads=8)
    # Randomise every parameter, zero-initialised ones included, so that no part of the model is a no-op.
    for module in (unet, vae, alignment) + ((lq_encoder,) if lq_encoder is not None else ()):
        for name, param in module.named_parameters():
            scale = 1.0 if param.ndim == 1 and name.endswith("weight") else 0.0  # norm weights around 1
            param.data.copy_(scale + 0.1 * torch.randn_like(param))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return dict(
        vae=vae.eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=32)).eval(),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet.eval(),
        alignment=alignment.eval(),
        scheduler=scheduler,
        lq_encoder=lq_encoder,
    )


def fast_call(**overrides) -> dict:
    """Common arguments for quick pipeline runs on tiny components."""
    kwargs = dict(prompt="a photo", num_inference_steps=2, output_type="pt", tile_size=64)
    kwargs.update(overrides)
    return kwargs


CAPTION_WORDS = (
    "USER: ASSISTANT: Describe this image and its style in a very detailed manner. The features photo of cat dog "
    "house tree red blue old garden. A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
).split()


def tiny_captioner(seed: int = 0) -> tuple:
    """A tiny random LLaVA (CLIP vision tower + Llama) and its processor, built in code: (model, processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    for word in CAPTION_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_index=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(config).eval(), processor


def structured_photo(width: int, height: int, seed: int) -> PIL.Image.Image:
    """A structured RGB picture (gradients and a random texture) that survives degradation recognisably."""
    y, x = np.mgrid[0:height, 0:width]
    texture = np.random.default_rng(seed).integers(0, 64, (height, width))
    rgb = np.stack([(x * (seed + 3)) % 256, (y * (seed + 5)) % 256, ((x + y) * 7 + texture) % 256], axis=-1)
    return PIL.Image.fromarray(rgb.astype(np.uint8))
