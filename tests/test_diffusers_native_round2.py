"""diffusers-native use, round 2: shared components in threads, encode-only pipelines, diffusers' own callbacks and
dynamic CFG, diffusers' argument order, and the LoRA lifecycle."""

from __future__ import annotations

import copy
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from tiny_models import fast_call, tiny_components

from faithdiff_pipeline import FaithDiffSDXLPipeline

THREADS = 16


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _photo(seed: int, size: tuple[int, int] = (20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request_copy(pipe, pipeline_class=FaithDiffSDXLPipeline):
    """One request's pipeline, as diffusers' server examples make it: ``from_pipe`` shares the weights; the scheduler
    (per-run state) and the tokenizers (transformers' tokenizers change their padding state on every call, so a shared
    one is not thread-safe, with a stock SDXL pipeline too) are the request's own."""
    copied = pipeline_class.from_pipe(
        pipe,
        scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
        tokenizer=copy.deepcopy(pipe.tokenizer),
        tokenizer_2=copy.deepcopy(pipe.tokenizer_2),
    )
    copied.set_progress_bar_config(disable=True)
    return copied


def _concurrently(jobs: list) -> list:
    """Runs the jobs in threads released together; their results (or exceptions), in order."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = jobs[index]()
        except Exception as error:  # noqa: BLE001 (a failed job is a result the test reports)
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# ------------------------------------------------------------------------------------------- 1. shared components


def test_concurrent_from_pipe_copies_each_get_their_own_result(pipe) -> None:
    def restore(copied, index):
        return copied(_photo(index), **fast_call(generator=_seeded(index))).images

    sequential = [restore(pipe, index) for index in range(THREADS)]
    copies = [_request_copy(pipe) for _ in range(THREADS)]
    concurrent = _concurrently([lambda c=c, i=i: restore(c, i) for i, c in enumerate(copies)])
    wrong = [i for i in range(THREADS) if not isinstance(concurrent[i], torch.Tensor)]
    wrong += [i for i in range(THREADS) if i not in wrong and not torch.equal(concurrent[i], sequential[i])]
    assert wrong == [], f"{len(wrong)} of {THREADS} concurrent results differ from the sequential ones"
    # The inputs differ, so equal results above mean each thread got its own condition.
    assert len({round(float(result.sum()), 3) for result in sequential}) == THREADS


def test_a_stock_sdxl_pipeline_sharing_the_unet_is_unaffected(pipe) -> None:
    def img2img(stock):
        image = torch.from_numpy(_photo(7, (64, 64))).permute(2, 0, 1)[None].float() / 255
        return stock(
            "a photo", image=image, num_inference_steps=4, strength=1.0, output_type="pt", generator=_seeded(7)
        ).images

    def restore(copied, index):
        # A 64 x 64 result: the FaithDiff condition has the shape of the stock pipeline's conv_in output.
        return copied(_photo(index, (32, 32)), **fast_call(generator=_seeded(index), num_inference_steps=4)).images

    solo = img2img(_request_copy(pipe, StableDiffusionXLImg2ImgPipeline))
    jobs = [lambda c=_request_copy(pipe, StableDiffusionXLImg2ImgPipeline): img2img(c) for _ in range(THREADS // 2)]
    jobs += [lambda c=_request_copy(pipe), i=i: restore(c, i) for i in range(THREADS // 2)]
    results = _concurrently(jobs)
    stock_results = results[: THREADS // 2]
    assert [result for result in results if not isinstance(result, torch.Tensor)] == []
    assert all(torch.equal(result, solo) for result in stock_results)
