"""torch's compile caches on disk under our cache folder: a second process reuses them; another shape or dtype not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from faithdiff_pipeline.loading import use_compile_cache

folder = use_compile_cache(sys.argv[1])
model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
runs = []
for shape, dtype in json.loads(sys.argv[2]):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.to(getattr(torch, dtype)), fullgraph=True, dynamic=False)
    compiled(torch.randn(shape, dtype=getattr(torch, dtype)))
    runs.append([counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]])
print(json.dumps({"folder": folder, "runs": runs}))
"""


def _compile_in_a_new_process(folder, cases) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), json.dumps(cases)],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in __import__("os").environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_compiles_from_the_cache_and_other_shapes_or_dtypes_do_not_hit(tmp_path) -> None:
    import torch

    first = _compile_in_a_new_process(tmp_path, [[[1, 4, 16, 16], "float32"]])
    assert first["folder"] == str(tmp_path / f"torch-{torch.__version__}")
    assert first["runs"] == [[0, 1]]
    second = _compile_in_a_new_process(
        tmp_path, [[[1, 4, 16, 16], "float32"], [[1, 4, 24, 16], "float32"], [[1, 4, 16, 16], "bfloat16"]]
    )
    assert second["runs"] == [[1, 0], [0, 1], [0, 1]]
