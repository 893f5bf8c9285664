"""Attention maps of the caption's words, made as DAAM makes them (Tang et al., "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention", ACL 2023): where the UNet's cross-attention looks at each chosen word, summed over
heads, layers and denoising steps, carried across the pipeline's latent tiles with their Gaussian blending weights.

The probabilities are recomputed beside the default attention processors, in forward pre-hooks of the recorded
layers, from the very inputs those layers receive; the layers' outputs, and so the restored image, are untouched.

The recorder knows nothing of the pipeline that runs it. The pipeline hands it, through :meth:`AttentionMapRecorder.
recording`, the UNet whose layers it records, each result's prompt as the text encoders read it
(:class:`PromptTokens`) and the latent tiling, and before every UNet call says which rows of the batch are conditioned
on the prompt and where each belongs (:class:`UNetCall`).
"""

from __future__ import annotations

import contextvars
import fnmatch
import re
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .checks import is_integer

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import PreTrainedTokenizerBase

    from .tiling import LatentTiling

# CLIP's byte-pair encoding ends the last piece of every word with this marker: it tells where words begin.
WORD_END = "</w>"
# The classic "jet" heat-map scale: anchor positions in [0, 1] and their RGB colours, cold to hot.
_JET_POSITIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_COLOURS = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------- words


def clean_word(word: object) -> str:
    """``word`` without surrounding spaces and punctuation (``"cap."`` is the word ``cap``); inner punctuation stays
    (``"t-shirt"``), and several words make a phrase that is looked for as a whole."""
    if not isinstance(word, str):
        raise TypeError(f"`words` must hold strings, got {type(word).__name__} ({word!r}).")
    cleaned = word.strip().strip(string.punctuation).strip()
    if not cleaned:
        raise ValueError(
            f"`words` holds {word!r}, which is empty once surrounding spaces and punctuation are dropped."
        )
    return cleaned


def absent_words(text: str, words: Sequence[str]) -> list[str]:
    """The ``words`` that do not occur in ``text`` as whole words, in any case: a check that needs no tokenizer,
    for commands to run before loading a model (a word found here may still be cut off by the tokenizers' length)."""
    folded = text.casefold()
    return [
        word
        for word in words
        if not re.search(rf"(?<![\w]){re.escape(clean_word(word).casefold())}(?![\w])", folded)
    ]


def _folded(tokens: Sequence[str]) -> list[str]:
    return [token.casefold() for token in tokens]


def _occurrences(tokens: list[str], target: list[str], special: set[str]) -> list[int]:
    """Positions in ``tokens`` of every occurrence of ``target`` that starts a word, all of its tokens."""
    positions: list[int] = []
    if not target:
        return positions
    for start in range(len(tokens) - len(target) + 1):
        starts_word = start == 0 or tokens[start - 1] in special or tokens[start - 1].endswith(WORD_END)
        if starts_word and tokens[start : start + len(target)] == target:
            positions.extend(range(start, start + len(target)))
    return positions


def word_positions(tokenizer: PreTrainedTokenizerBase, text: str, word: str) -> list[int]:
    """Where ``word`` is in ``text`` as the text encoder reads it: positions in the token sequence the pipeline
    encodes (start token at 0, truncated to the tokenizer's length), of all tokens of every occurrence.

    Words match whole (``ear`` is not found in ``beard``) and regardless of case; a word of several byte-pair tokens
    gives all of them. Raises ``ValueError`` when ``word`` is in ``text`` only past the truncation."""
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return PromptTokens(text, ids, tokenizer).word_positions(word)


@dataclass(frozen=True)
class PromptTokens:
    """One prompt as one text encoder reads it: what a recorder needs to find words in it.

    Attributes:
        text (`str`): The prompt as written (the caption, when the pipeline wrote one); messages quote it, and a word
            found in it only past the truncation is told apart from a word it lacks.
        input_ids (`Sequence[int]`): The token ids the text encoder reads, start token first, truncated and padded
            as they are encoded: their count is the number of tokens the UNet's cross-attention attends to.
        tokenizer (`PreTrainedTokenizerBase`): The tokenizer that made them, which splits the words the same way.
    """

    text: str
    input_ids: Sequence[int]
    tokenizer: PreTrainedTokenizerBase

    def word_positions(self, word: str) -> list[int]:
        """The positions in ``input_ids`` of all tokens of every whole-word occurrence of ``word``, in any case."""
        special = set(_folded(self.tokenizer.all_special_tokens))
        target = _folded(self.tokenizer.tokenize(word))
        positions = _occurrences(_folded(self.tokenizer.convert_ids_to_tokens(list(self.input_ids))), target, special)
        if not positions and _occurrences(_folded(self.tokenizer.tokenize(self.text)), target, special):
            raise ValueError(
                f"The word {word!r} of the prompt {self.text!r} lies beyond the {len(self.input_ids)} tokens the "
                "text encoder reads; shorten the prompt or choose an earlier word."
            )
        return positions


# ---------------------------------------------------------------------------------------------------------- layers


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """The UNet's cross-attention layers (the ``attn2`` of its transformer blocks), by module name."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }


def layer_downsampling(name: str, unet: UNet2DConditionModel) -> int | None:
    """How many times smaller than the latent tile the maps of layer ``name`` are (1, 2, 4, ...), read from where
    the layer sits in the UNet; ``None`` for a layer outside its down, mid and up blocks."""
    block, _, rest = name.partition(".")
    levels = len(unet.config.block_out_channels)
    if block == "mid_block":
        return 2 ** (levels - 1)
    index = rest.partition(".")[0]
    if block == "down_blocks" and index.isdigit():
        return 2 ** int(index)
    if block == "up_blocks" and index.isdigit():
        return 2 ** (levels - 1 - int(index))
    return None


def _matches(name: str, pattern: str) -> bool:
    # A pattern that names a block selects every layer below it.
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _layer_summary(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        block = name.split(".attentions")[0]
        counts[block] = counts.get(block, 0) + 1
    return ", ".join(f"{block} ({count})" for block, count in counts.items())


def cross_attention_probabilities(
    module: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """softmax(Q K^T * scale) of a cross-attention layer, in float32: ``[batch, heads, pixels, tokens]``.

    Computed from the layer's own projections and normalisations, as its default processor computes them. The
    pipeline gives the UNet no encoder attention mask, so none is applied."""
    if module.norm_cross:
        encoder_hidden_states = module.norm_encoder_hidden_states(encoder_hidden_states)
    query = module.to_q(hidden_states).unflatten(-1, (module.heads, -1)).transpose(1, 2)
    key = module.to_k(encoder_hidden_states).unflatten(-1, (module.heads, -1)).transpose(1, 2)
    if module.norm_q is not None:
        query = module.norm_q(query)
    if module.norm_k is not None:
        key = module.norm_k(key)
    scores = query.float() @ key.float().transpose(-1, -2)
    return (scores * module.scale).softmax(dim=-1)


def _map_grid(pixels: int, tile_height: int, tile_width: int) -> tuple[int, int]:
    """The ``(height, width)`` of a layer's map of ``pixels`` positions: the tile halved (rounding up, as the UNet's
    strided convolutions do) as often as it takes."""
    height, width = tile_height, tile_width
    while height * width > pixels:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != pixels:
        raise ValueError(
            f"A cross-attention layer saw {pixels} positions, which is no halving of the {tile_height} x "
            f"{tile_width} latent tile; the recorder cannot place its maps."
        )
    return height, width


# ---------------------------------------------------------------------------------------------------- the overlay


def heat_colours(values: np.ndarray) -> np.ndarray:
    """The "jet" colour of each value (clipped to [0, 1]): ``values.shape + (3,)`` RGB in [0, 1], float32."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(clipped, _JET_POSITIONS, _JET_COLOURS[:, channel]) for channel in range(3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def overlay_heat_map(image: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """A heat map laid over an image: ``(1 - opacity) * image + opacity * heat_colours(heat)``.

    Args:
        image (`np.ndarray`): ``[H, W, 3]`` RGB, float in [0, 1] (the pipeline's ``output_type="np"``) or uint8.
        heat (`np.ndarray`): ``[H, W]`` values in [0, 1], e.g. one of :attr:`AttentionMapRecorder.maps`.
        opacity (`float`, defaults to 0.5): Weight of the colours, from 0 (the image alone) to 1 (the colours alone).

    Returns:
        `np.ndarray`: ``[H, W, 3]`` float32 in [0, 1].
    """
    image = np.asarray(image)
    colour = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    if colour.ndim != 3 or colour.shape[-1] != 3:
        raise ValueError(f"`image` must be [H, W, 3] RGB, got shape {colour.shape}.")
    if np.shape(heat) != colour.shape[:2]:
        raise ValueError(f"`heat` must be [H, W] = {colour.shape[:2]} like `image`, got shape {np.shape(heat)}.")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"`opacity` must be between 0 and 1, got {opacity!r}.")
    return ((1.0 - opacity) * colour + opacity * heat_colours(heat)).clip(0.0, 1.0)


# -------------------------------------------------------------------------------------------------------- recorder


# The recording of the pipeline call running in this thread (a UNet call runs in its caller's thread): the layers'
# hooks record only their own call's UNet calls, not those of other calls that share the UNet.
_ACTIVE_RECORDING: contextvars.ContextVar[AttentionRecording | None] = contextvars.ContextVar(
    "faithdiff_attention_recording", default=None
)


@dataclass(frozen=True)
class UNetCall:
    """What one UNet call of the denoising loop computes, as attention maps need it: which rows of its batch are
    conditioned on the prompt, and where each of them belongs.

    Attributes:
        step (`int`): The denoising step, counted from 0.
        rows (`range`): The rows of the UNet batch conditioned on the prompt. With classifier-free guidance the batch
            also holds unconditional rows, whose attention is not the prompt's: they are left out.
        tiles (`Sequence[int]`): For each row of ``rows``, the latent tile its hidden states cover, an index into the
            tiling's ``origins``.
        samples (`Sequence[int]`): For each row of ``rows``, the result it belongs to, an index into the prompts
            given to :meth:`AttentionMapRecorder.recording`.
    """

    step: int
    rows: range
    tiles: Sequence[int]
    samples: Sequence[int]

    def __post_init__(self) -> None:
        if not len(self.rows) == len(self.tiles) == len(self.samples):
            raise ValueError(
                f"`UNetCall` needs a tile and a sample for each row; got {len(self.rows)} rows, {len(self.tiles)} "
                f"tiles and {len(self.samples)} samples."
            )


@dataclass
class AttentionRecording:
    """One pipeline call's recording: what its recorded layers need while the UNet runs, and what they have summed so
    far. :meth:`AttentionMapRecorder.recording` yields it; the pipeline calls :meth:`unet_call` before each UNet call.
    """

    tiling: LatentTiling
    steps: frozenset[int] | None
    # [samples, tokens, words]: each word's token columns, each weighted 1 / its token count (the word's mean).
    selection: torch.Tensor
    image_size: tuple[int, int]
    scale_factor: int
    canvas: torch.Tensor
    coverage: torch.Tensor
    call: UNetCall | None = field(default=None)

    def unet_call(self, call: UNetCall) -> None:
        """Says what the next UNet call computes (see [`UNetCall`]); a call of a step not recorded records nothing."""
        samples = self.selection.shape[0]
        if any(not 0 <= sample < samples for sample in call.samples):
            raise ValueError(f"`call.samples` must index the {samples} results' prompts, got {list(call.samples)}.")
        self.call = call if self.steps is None or call.step in self.steps else None


class AttentionMapRecorder:
    r"""
    Records DAAM attention maps of chosen words of the prompt while [`FaithDiffSDXLPipeline`] restores an image.

    Pass it as ``attention_maps`` to the pipeline call; afterwards :attr:`maps` holds, per word, where the UNet's
    cross-attention looked at it, at the size of the result and normalised to [0, 1]. The restored image is the same,
    bit for bit, as without the recorder. A recorder can serve several calls; each replaces the previous maps (with
    calls that run at once, in threads, the maps are those of the call that ends last: give each its own recorder).

    Per recorded layer and step, the conditional half of the UNet batch (not the unconditional CFG copies) gives the
    attention probabilities of the word's tokens (the mean of its tokens for a word of several, over every time it
    occurs); each head's map is upsampled bicubically to the latent tile (negative undershoot clipped) and the heads
    are summed. The tiles' maps are blended into the whole latent with the Gaussian weights that blend the noise
    predictions, summed over layers and steps, upsampled bicubically to the image and normalised to [0, 1].

    Args:
        words (`str` or `Sequence[str]`): The words to map, matched whole and case-insensitively to the tokens of the
            pipeline's two tokenizers; surrounding punctuation is dropped (``"cap."`` maps ``cap``). A phrase of
            several words maps its tokens together. A word the prompt lacks is an error at the pipeline call.
        layers (`Sequence[str]`, *optional*): Glob patterns (``fnmatch``) of the cross-attention layers to record,
            matched against their module names in the UNet, e.g. ``"up_blocks.*"``; a pattern naming a block
            (``"mid_block"``, ``"down_blocks.2"``) selects all its layers. Defaults to all layers, as DAAM does.
        downsampling (`Sequence[int]`, *optional*): Only the layers whose maps are the latent tile downsampled by
            these factors (SDXL at a 1024 px tile: 2 gives the 64 x 64 maps, 4 the 32 x 32 ones). Defaults to all.
        steps (`Sequence[int]`, *optional*): The denoising steps to record, counted from 0 in the order they run.
            Defaults to all.

    Attributes:
        maps (`dict[str, np.ndarray]`): Per word, ``[batch, height, width]`` float32 in [0, 1], one map per result
            (images x ``num_images_per_prompt``) at its size.
        latent_maps (`torch.Tensor`): ``[batch, words, latent height, latent width]``: the blended sums before
            upsampling and normalisation (the padded latent), on the CPU.
        coverage (`torch.Tensor`): ``[latent height, latent width]``: the blending weights recorded at each latent
            pixel, summed over tiles, layers and steps (positive wherever the maps are defined).
        token_positions (`list[dict[str, list[int]]]`): Per result, each word's positions in the encoded tokens.
        prompts (`list[str]`): Per result, the prompt the words were found in (the caption, when the pipeline wrote
            one).
        recorded_layers (`list[str]`): The module names of the recorded layers.
    """

    def __init__(
        self,
        words: str | Sequence[str],
        layers: Sequence[str] | None = None,
        downsampling: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
    ) -> None:
        self.words = self._check_words([words] if isinstance(words, str) else words)
        self.layers = None if layers is None else self._check_patterns(layers)
        self.downsampling = None if downsampling is None else self._check_counts(downsampling, "downsampling", 1)
        self.steps = None if steps is None else self._check_counts(steps, "steps", 0)
        self.maps: dict[str, np.ndarray] = {}
        self.latent_maps: torch.Tensor | None = None
        self.coverage: torch.Tensor | None = None
        self.token_positions: list[dict[str, list[int]]] = []
        self.prompts: list[str] = []
        self.recorded_layers: list[str] = []

    @staticmethod
    def _check_words(words: Sequence[str]) -> list[str]:
        if not isinstance(words, Sequence) or not words:
            raise ValueError(f"`words` must name at least one word, got {words!r}.")
        cleaned = [clean_word(word) for word in words]
        folded = [word.casefold() for word in cleaned]
        repeated = sorted({word for word in cleaned if folded.count(word.casefold()) > 1})
        if repeated:
            raise ValueError(f"`words` names {repeated} more than once (words match regardless of case).")
        return cleaned

    @staticmethod
    def _check_patterns(patterns: Sequence[str]) -> list[str]:
        if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns:
            raise ValueError(f"`layers` must be a non-empty list of name patterns, got {patterns!r}.")
        bad = [pattern for pattern in patterns if not isinstance(pattern, str) or not pattern.strip()]
        if bad:
            raise ValueError(f"`layers` patterns must be non-empty strings, got {bad}.")
        return [pattern.strip() for pattern in patterns]

    @staticmethod
    def _check_counts(values: Sequence[int], name: str, minimum: int) -> list[int]:
        if not isinstance(values, Sequence) or not values:
            raise ValueError(f"`{name}` must be a non-empty list of integers, got {values!r}.")
        bad = [v for v in values if not is_integer(v) or v < minimum]
        if bad:
            raise ValueError(f"`{name}` must hold integers of at least {minimum}, got {bad}.")
        return sorted(set(values))

    def select_layers(self, unet: UNet2DConditionModel) -> dict[str, Attention]:
        """The cross-attention layers of ``unet`` this recorder records, by name; raises ``ValueError`` for a
        ``layers`` pattern or a ``downsampling`` factor that selects none of them."""
        available = cross_attention_layers(unet)
        if not available:
            raise ValueError(f"`unet` ({type(unet).__name__}) has no cross-attention layers to record.")
        chosen = dict(available)
        if self.layers is not None:
            unmatched = [pattern for pattern in self.layers if not any(_matches(name, pattern) for name in available)]
            if unmatched:
                raise ValueError(
                    f"`layers` pattern(s) {unmatched} match no cross-attention layer of the UNet; its layers are "
                    f"named like {next(iter(available))!r}, in {_layer_summary(list(available))}."
                )
            chosen = {name: m for name, m in chosen.items() if any(_matches(name, p) for p in self.layers)}
        if self.downsampling is not None:
            factors = {name: layer_downsampling(name, unet) for name in chosen}
            missing = [factor for factor in self.downsampling if factor not in factors.values()]
            if missing:
                found = sorted({factor for factor in factors.values() if factor is not None})
                raise ValueError(
                    f"`downsampling` {missing} selects no layer: the chosen cross-attention layers make maps "
                    f"downsampled by {found}."
                )
            chosen = {name: m for name, m in chosen.items() if factors[name] in self.downsampling}
        return chosen

    def _find_words(self, prompts: Sequence[Sequence[PromptTokens]]) -> list[dict[str, list[int]]]:
        """Each word's token positions in each result's prompt, as every text encoder reads it (SDXL concatenates the
        two encoders' states token by token, so a position found by either is that token's column)."""
        found = []
        for encoded in prompts:
            positions = {}
            for word in self.words:
                columns: set[int] = set()
                for tokens in encoded:
                    columns.update(tokens.word_positions(word))
                if not columns:
                    others = [tokens.text for tokens in encoded[1:] if tokens.text != encoded[0].text]
                    also = "".join(f" nor in `prompt_2` {text!r}" for text in others[:1])
                    raise ValueError(
                        f"The word {word!r} is not in the prompt {encoded[0].text!r}{also}; map words of the prompt."
                    )
                positions[word] = sorted(columns)
            found.append(positions)
        return found

    def _selection(self, positions: list[dict[str, list[int]]], tokens: int, device: torch.device) -> torch.Tensor:
        selection = torch.zeros(len(positions), tokens, len(self.words), dtype=torch.float32)
        for sample, per_word in enumerate(positions):
            for column, word in enumerate(self.words):
                selection[sample, per_word[word], column] = 1.0 / len(per_word[word])
        return selection.to(device)

    @contextmanager
    def recording(
        self,
        unet: UNet2DConditionModel,
        prompts: Sequence[Sequence[PromptTokens]],
        tiling: LatentTiling,
        image_size: tuple[int, int],
        scale_factor: int,
        num_steps: int,
    ) -> Iterator[AttentionRecording]:
        """Records the UNet calls of one pipeline call's denoising loop, which runs inside the block; the maps are
        made when it ends without error. The pipeline opens it (see the ``attention_maps`` argument of
        [`FaithDiffSDXLPipeline.__call__`]) and, before each UNet call, tells the recording it yields which rows of
        the batch to map ([`AttentionRecording.unet_call`]).

        Only UNet calls made by the thread that opened the recording are recorded: other pipeline calls sharing the
        UNet, in other threads, leave it untouched.

        Args:
            unet ([`UNet2DConditionModel`]): The UNet whose cross-attention layers are recorded.
            prompts (`Sequence[Sequence[PromptTokens]]`): For each result (images x ``num_images_per_prompt``, in the
                order of the UNet batch's samples), its prompt as each text encoder reads it.
            tiling ([`~faithdiff_pipeline.tiling.LatentTiling`]): The call's latent tiles.
            image_size (`tuple[int, int]`): ``(height, width)`` of the results.
            scale_factor (`int`): Pixels per latent pixel (the VAE's scale factor).
            num_steps (`int`): Steps of the denoising loop.
        """
        beyond = [step for step in self.steps or () if step >= num_steps]
        if beyond:
            raise ValueError(
                f"`steps` {beyond} of the attention-map recorder are beyond the {num_steps} denoising steps (counted "
                "from 0)."
            )
        layers = self.select_layers(unet)
        positions = self._find_words(prompts)
        samples = len(positions)
        device = tiling.device
        recording = AttentionRecording(
            tiling=tiling,
            steps=None if self.steps is None else frozenset(self.steps),
            selection=self._selection(positions, len(prompts[0][0].input_ids), device),
            image_size=image_size,
            scale_factor=scale_factor,
            canvas=torch.zeros(samples, len(self.words), tiling.height, tiling.width, device=device),
            coverage=torch.zeros(tiling.height, tiling.width, device=device),
        )
        # The previous call's maps go now, so that a failed call never leaves them looking like this one's.
        self.maps, self.latent_maps, self.coverage = {}, None, None
        self.token_positions = positions
        self.prompts = [encoded[0].text for encoded in prompts]
        self.recorded_layers = list(layers)
        record = partial(self._record, recording)
        handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in layers.values()]
        active = _ACTIVE_RECORDING.set(recording)
        try:
            yield recording
        finally:
            _ACTIVE_RECORDING.reset(active)
            for handle in handles:
                handle.remove()
        self._make_maps(recording)

    @torch.no_grad()
    def _record(self, recording: AttentionRecording, module: Attention, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of a recorded layer: adds its word maps of the current UNet call to the canvas."""
        call = recording.call
        if _ACTIVE_RECORDING.get() is not recording or call is None:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        if len(call.rows) and max(call.rows) >= hidden_states.shape[0]:
            raise ValueError(
                f"A cross-attention layer got a batch of {hidden_states.shape[0]} rows, but the UNet call was "
                f"described with rows up to {max(call.rows)}."
            )
        if context.shape[1] != recording.selection.shape[1]:
            raise ValueError(
                f"The UNet attends to {context.shape[1]} tokens, expected {recording.selection.shape[1]} (the "
                "prompt's encoded length)."
            )
        rows = slice(call.rows.start, call.rows.stop, call.rows.step)
        probabilities = cross_attention_probabilities(module, hidden_states[rows], context[rows])
        selection = recording.selection[list(call.samples)]
        word_maps = torch.einsum("rhpt,rtw->rwhp", probabilities, selection)
        tiling = recording.tiling
        tile_size = (tiling.tile_height, tiling.tile_width)
        grid = _map_grid(probabilities.shape[2], *tile_size)
        upsampled = F.interpolate(word_maps.flatten(0, 1).unflatten(-1, grid), size=tile_size, mode="bicubic")
        per_row = upsampled.clamp_min(0).sum(dim=1).view(len(call.tiles), len(self.words), *tile_size)
        for tile in dict.fromkeys(call.tiles):
            members = [row for row, row_tile in enumerate(call.tiles) if row_tile == tile]
            top, left = tiling.origins[tile]
            window = (slice(top, top + tiling.tile_height), slice(left, left + tiling.tile_width))
            samples = [call.samples[row] for row in members]
            recording.canvas[(samples, slice(None), *window)] += per_row[members] * tiling.weights
            recording.coverage[window] += tiling.weights

    def _make_maps(self, recording: AttentionRecording) -> None:
        covered = recording.coverage > 0
        blended = torch.where(covered, recording.canvas / recording.coverage.clamp_min(1e-30), 0.0)
        height, width = recording.image_size
        factor = recording.scale_factor
        padded = (blended.shape[-2] * factor, blended.shape[-1] * factor)
        image = F.interpolate(blended, size=padded, mode="bicubic")[..., :height, :width].clamp_min(0)
        low = image.amin(dim=(-2, -1), keepdim=True)
        span = image.amax(dim=(-2, -1), keepdim=True) - low
        # A constant map (a word attended to evenly, or nothing recorded) normalises to zeros.
        normalised = ((image - low) / span.clamp_min(torch.finfo(image.dtype).tiny)).cpu().numpy()
        self.maps = {word: normalised[:, column] for column, word in enumerate(self.words)}
        self.latent_maps = blended.cpu()
        self.coverage = recording.coverage.cpu()
