"""OCR evaluation: text metrics against hand-computed values, ground-truth formats, text sets, the tesseract and
PaddleOCR backends, and `faithdiff-eval --ocr` end to end."""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import pytest
from tiny_models import tiny_components

from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.evaluation import (
    ImageText,
    OcrUnavailableError,
    PaddleOcrBackend,
    TesseractBackend,
    TextNormalization,
    WordBox,
    character_error_rate,
    edit_distance,
    make_synthetic_set,
    make_text_set,
    normalized_edit_distance,
    read_csv,
    read_text_truth,
    score_text,
)
from faithdiff_pipeline.evaluation import cli as eval_cli
from faithdiff_pipeline.evaluation import methods as eval_methods
from faithdiff_pipeline.evaluation.ocr_backends import paddle_device
from faithdiff_pipeline.evaluation.ocr_truth import parse_icdar_words
from faithdiff_pipeline.evaluation.text_metrics import page_scores, word_scores

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
SIGNS = {
    "signs": ["HARBOUR", "STREET", "PARKING", "EXIT", "MARKET", "BRIDGE", "SCHOOL", "GARDEN"],
    "shops": ["BAKERY", "CINEMA", "LIBRARY", "STATION", "MUSEUM", "HOTEL", "PHARMACY", "TUNNEL"],
}
FOLDED = TextNormalization()


@pytest.fixture(scope="module")
def tesseract() -> TesseractBackend:
    """The real tesseract; a skip where it is missing, a failure under CI (whose .ci/run installs it)."""
    try:
        return TesseractBackend()
    except OcrUnavailableError as error:
        if os.environ.get("CI"):
            pytest.fail(f"tesseract is not usable, and CI must install it (.ci/run, the test extra): {error}")
        pytest.skip(f"tesseract is not usable here: {error}")


def _font(size: int) -> PIL.ImageFont.FreeTypeFont:
    if not FONT.is_file():
        pytest.fail(f"{FONT} is missing: Debian's fonts-dejavu-core ships it, and the OCR tests render with it.")
    return PIL.ImageFont.truetype(str(FONT), size)


def _render(words: list[str], size: tuple[int, int] = (386, 258)) -> tuple[PIL.Image.Image, list[WordBox]]:
    """Dark words on a light background, two per row, 32-px DejaVu Sans, and their boxes."""
    image = PIL.Image.new("RGB", size, (235, 235, 225))
    draw = PIL.ImageDraw.Draw(image)
    boxes = []
    for index, word in enumerate(words):
        x, y = 16 + (index % 2) * 192, 16 + (index // 2) * 60
        draw.text((x, y), word, font=_font(32), fill=(20, 30, 60))
        left, top, right, bottom = draw.textbbox((x, y), word, font=_font(32))
        boxes.append(WordBox(((left, top), (right, top), (right, bottom), (left, bottom)), word))
    return image, boxes


def _icdar(boxes: list[WordBox]) -> str:
    return "".join(",".join(f"{v:g}" for p in b.points for v in p) + f",{b.text}\n" for b in boxes)


@pytest.fixture
def text_sources(tmp_path) -> tuple[Path, Path, Path]:
    """Two sign images (not a multiple of 4 in size), their ICDAR word boxes (one "###" box cut by the crop to a
    multiple of 4) and a JSON manifest of their texts."""
    images, boxes = tmp_path / "sources", tmp_path / "gt"
    images.mkdir()
    boxes.mkdir()
    texts = {}
    for name, words in SIGNS.items():
        image, words_boxes = _render(words)
        image.save(images / f"{name}.png")
        cut = WordBox(((300, 240), (385, 240), (385, 257), (300, 257)), "###")
        (boxes / f"gt_{name}.txt").write_text("\ufeff" + _icdar([*words_boxes, cut]), encoding="utf-8")
        texts[f"{name}.png"] = " ".join(words)
    manifest = tmp_path / "texts.json"
    manifest.write_text(json.dumps(texts), encoding="utf-8")
    return images, boxes, manifest


# ---------------------------------------------------------------------------------------------------------------------
# Text metrics, by hand


@pytest.mark.parametrize(
    "reference, prediction, distance",
    [
        ("kitten", "sitting", 3),  # two substitutions and an insertion
        ("STOP", "ST0P", 1),
        ("flaw", "lawn", 2),
        ("ab", "ba", 2),  # Levenshtein has no transposition
        ("abc", "", 3),
        ("", "abc", 3),
        ("", "", 0),
        ("straße", "strasse", 2),
    ],
)
def test_edit_distance_matches_hand_counts(reference, prediction, distance) -> None:
    assert edit_distance(reference, prediction) == distance == edit_distance(prediction, reference)


def test_cer_and_ned_match_hand_computed_values() -> None:
    assert character_error_rate("kitten", "sitting") == 3 / 6
    assert normalized_edit_distance("kitten", "sitting") == 3 / 7
    assert character_error_rate("ab", "abcdef") == 4 / 2  # CER is not bounded by 1; NED is
    assert normalized_edit_distance("ab", "abcdef") == 4 / 6
    assert normalized_edit_distance("abc", "") == 1.0 and normalized_edit_distance("", "") == 0.0
    with pytest.raises(ValueError, match="`reference` is empty"):
        character_error_rate("", "abc")

    # Word by word: "STOP" is read right once case is folded; "Main St" as "Main 5t." costs 2 edits of 7 and 8.
    scores = word_scores(["STOP", "Main  St"], ["stop", "Main 5t."], FOLDED)
    assert scores == pytest.approx({"word-acc": 0.5, "cer": 2 / 11, "ned": (0 / 4 + 2 / 8) / 2})
    assert word_scores(["Stop"], ["STOP"], TextNormalization(case_sensitive=True))["cer"] == 3 / 4

    # A whole image: whitespace and line breaks collapse; one wrong letter in 20; 3 of 4 words found.
    scores = page_scores("EXIT  ONLY\nNO parking", " exit only no parkinq\n", FOLDED)
    assert scores == pytest.approx({"word-acc": 3 / 4, "cer": 1 / 20, "ned": 1 / 20})


def test_normalisation_is_nfkc_whitespace_and_case() -> None:
    assert (
        FOLDED("  Ca\u0301fe\u0301\tﬁ  \n ＳＴＯＰ ") == "cáfé fi stop"
    )  # decomposed accents, a ligature, full width
    assert TextNormalization(case_sensitive=True)("Exit\n") == "Exit"
    assert "case-insensitive" in FOLDED.describe()


# ---------------------------------------------------------------------------------------------------------------------
# Ground truth


def test_icdar_files_are_parsed_with_commas_dont_care_and_byte_order_mark(tmp_path) -> None:
    path = tmp_path / "gt_img_1.txt"
    path.write_text("\ufeff10,20,50,20,50,40,10,40,Hello, world\r\n\n1.5,2,8,2,8,9,1.5,9,###\n", encoding="utf-8")
    hello, hidden = parse_icdar_words(path)
    assert hello.text == "Hello, world" and hello.bounds() == (10, 20, 50, 40) and not hello.ignored
    assert hidden.ignored and hidden.points[0] == (1.5, 2.0)
    assert hello.scaled(0.5, 2).bounds() == (5, 40, 25, 80)
    assert hello.clipped(30, 30).bounds() == (10, 20, 30, 30)
    truth = read_text_truth(tmp_path)
    assert truth.kind == "words" and [w.text for w in truth.images["img_1"].scored_words] == ["Hello, world"]

    path.write_text("10,20,50,20,50,40,10,40,ok\n10,20,50,x,50,40,10,40,bad\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 of ground-truth file .*gt_img_1.txt.* expected x1,y1"):
        read_text_truth(tmp_path)
    path.write_text("1,1,9,1,9,9,1,9,###\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"of 1 image\(s\) has nothing to read .*: img_1"):
        read_text_truth(tmp_path).check_covers(["img_1"])


def test_json_truth_maps_names_and_must_cover_the_set(tmp_path) -> None:
    path = tmp_path / "texts.json"
    path.write_text(json.dumps({"a.jpg": "ONE WAY", "b": "STOP"}), encoding="utf-8")
    truth = read_text_truth(path)
    assert truth.kind == "page" and truth.images["a"].text == "ONE WAY"
    with pytest.raises(ValueError, match=r"lacks 2 image\(s\) of the set: c, d"):
        truth.check_covers(["a", "b", "c", "d"])
    path.write_text(json.dumps({"a": ["ONE", "WAY"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="the values of a are not strings"):
        read_text_truth(path)


# ---------------------------------------------------------------------------------------------------------------------
# Text sets


def test_text_set_degrades_like_a_synthetic_set_and_carries_the_boxes(text_sources, tmp_path) -> None:
    images, boxes, manifest = text_sources
    dataset = make_text_set(images, tmp_path / "set", "dasr-level3", boxes, seed=4, progress=False)
    plain = make_synthetic_set(images, tmp_path / "plain", "dasr-level3", seed=4, progress=False)
    for ours, theirs in zip(dataset.pairs, plain.pairs):
        assert ours.lq.read_bytes() == theirs.lq.read_bytes()  # the same degradation, not another one
    assert dataset.pairs[0].hq_size == (384, 256) and dataset.pairs[0].lq_size == (96, 64)

    source = parse_icdar_words(boxes / "gt_signs.txt")
    hq = parse_icdar_words(tmp_path / "set" / "text" / "hq" / "gt_signs.txt")
    lq = parse_icdar_words(tmp_path / "set" / "text" / "lq" / "gt_signs.txt")
    assert [w.text for w in hq] == [w.text for w in lq] == [w.text for w in source]
    assert hq[:-1] == source[:-1]  # the top-left crop keeps coordinates
    assert hq[-1].bounds() == (300, 240, 384, 256)  # the box the crop cuts is clipped to the HQ image
    for hq_word, lq_word in zip(hq, lq):
        assert lq_word.points == tuple((round(x / 4), round(y / 4)) for x, y in hq_word.points)

    # A JSON manifest is carried as text.json, and replaces the boxes.
    make_text_set(images, tmp_path / "set", "dasr-level3", manifest, seed=4, progress=False)
    assert json.loads((tmp_path / "set" / "text.json").read_text()) == {n: " ".join(w) for n, w in SIGNS.items()}
    assert not (tmp_path / "set" / "text").exists()

    (boxes / "gt_shops.txt").unlink()
    with pytest.raises(ValueError, match=r"lacks 1 image\(s\) of the set: shops"):
        make_text_set(images, tmp_path / "other", "dasr-level3", boxes, progress=False)
    assert not (tmp_path / "other").exists()  # checked before anything is built


# ---------------------------------------------------------------------------------------------------------------------
# Backends


def test_tesseract_reads_a_rendered_word(tesseract) -> None:
    image = PIL.Image.new("RGB", (360, 90), "white")
    draw = PIL.ImageDraw.Draw(image)
    draw.text((20, 15), "Faithful", font=_font(48), fill="black")
    assert tesseract.read_word(image) == "Faithful"
    box = WordBox(((20, 20), (230, 20), (230, 75), (20, 75)), "FAITHFUL")
    scores, reading = score_text(image, ImageText(words=(box,)), image.size, tesseract, FOLDED)
    assert reading.predictions == ["Faithful"] and scores == {"word-acc": 1.0, "cer": 0.0, "ned": 0.0}

    # Boxes are measured in the HQ image: a result read at half that size is cropped at half the coordinates.
    half = image.resize((180, 45), PIL.Image.LANCZOS)
    _, reading = score_text(half, ImageText(words=(box,)), image.size, tesseract, FOLDED)
    assert FOLDED(reading.predictions[0]) == "faithful"
    assert "tesseract 5" in tesseract.describe() or "tesseract 4" in tesseract.describe()


def test_paddleocr_adapter_follows_the_documented_api(monkeypatch) -> None:
    """PaddleOCR 3 cannot be installed here: a stand-in with its documented classes checks what the adapter calls."""
    calls = []

    class Result(dict):  # PaddleX's results are dicts
        pass

    class TextRecognition:
        def __init__(self, **kwargs):
            calls.append(("TextRecognition", kwargs))

        def predict(self, input, batch_size):
            calls.append(("rec", input.copy(), batch_size))
            return [Result(rec_text="STOP", rec_score=0.98)]

    class PaddleOCR:
        def __init__(self, **kwargs):
            calls.append(("PaddleOCR", kwargs))

        def predict(self, input):
            return [Result(rec_texts=["NO", "PARKING"], rec_scores=[0.9, 0.8])]

    module = types.ModuleType("paddleocr")
    module.__version__ = "3.1.0"
    module.TextRecognition, module.PaddleOCR = TextRecognition, PaddleOCR
    paddle = types.ModuleType("paddle")
    paddle.__spec__ = importlib.machinery.ModuleSpec("paddle", None)
    monkeypatch.setitem(sys.modules, "paddleocr", module)
    monkeypatch.setitem(sys.modules, "paddle", paddle)

    backend = PaddleOcrBackend(device=paddle_device("cuda:1"))
    backend.load(words=True)
    crop = PIL.Image.new("RGB", (8, 4), (255, 0, 0))
    assert backend.read_word(crop) == "STOP"
    assert calls[0] == ("TextRecognition", {"model_name": "en_PP-OCRv3_mobile_rec", "device": "gpu:1"})
    _, array, batch_size = calls[1]
    assert batch_size == 1 and array.dtype == np.uint8 and array[0, 0].tolist() == [0, 0, 255]  # BGR
    assert backend.read_page(crop) == "NO PARKING"  # the pipeline is loaded on first use
    assert calls[2][1]["text_detection_model_name"] == "PP-OCRv3_mobile_det"
    assert calls[2][1]["use_doc_unwarping"] is False and calls[2][1]["use_textline_orientation"] is False
    assert paddle_device("cpu") == paddle_device("mps") == "cpu" and paddle_device("cuda") == "gpu:0"

    module.__version__ = "2.9.1"
    with pytest.raises(OcrUnavailableError, match="needs PaddleOCR 3 .*found version 2.9.1"):
        PaddleOcrBackend()


# ---------------------------------------------------------------------------------------------------------------------
# faithdiff-eval --ocr


def test_level3_degradation_lowers_word_accuracy(tesseract, text_sources, tmp_path, capsys) -> None:
    """The paper's RoadText setting in small: rendered signs degraded at DASR level 3 and read word by word. The HQ
    images themselves (a result folder) are read perfectly; their LANCZOS-upscaled LQ versions are not."""
    images, boxes, _ = text_sources
    set_dir, out = tmp_path / "set", tmp_path / "out"
    argv = ["--make-set", str(images), "--preset", "dasr-level3", "--seed", "0", "--set-dir", str(set_dir)]
    argv += ["--ocr-truth", str(boxes), "--ocr", "tesseract", "--metrics", "ssim", "--out", str(out)]
    argv += ["--method", "lanczos", "--method", f"hq={set_dir / 'hq'}"]
    assert eval_cli.main(argv) == 0

    rows = read_csv(out / "metrics.csv")

    def mean(method: str, score: str) -> float:
        return float(np.mean([row[score] for row in rows if row["method"] == method]))

    assert mean("hq", "word-acc") >= 0.9 and mean("hq", "cer") <= 0.05
    assert mean("lanczos", "word-acc") <= mean("hq", "word-acc") - 0.25
    assert mean("lanczos", "cer") >= mean("hq", "cer") + 0.1
    assert mean("lanczos", "ned") > mean("hq", "ned")

    table = (out / "table.md").read_text()
    assert "| Method | SSIM ↑ | Word acc ↑ | CER ↓ | NED ↓ |" in table
    assert "OCR by tesseract" in table and "on word boxes" in table and "case-insensitive" in table
    # ocr.jsonl holds what was read, and the CSV's scores are those of these readings.
    readings = [json.loads(line) for line in (out / "ocr.jsonl").read_text().splitlines()]
    assert [(r["method"], r["image"]) for r in readings] == [(r["method"], r["image"]) for r in rows]
    for reading, row in zip(readings, rows):
        assert reading["references"] == SIGNS[row["image"]]  # the "###" box is not read
        assert word_scores(reading["references"], reading["predictions"], FOLDED)["cer"] == row["cer"]


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-faithdiff")
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    return folder


def test_eval_reads_whole_images_of_faithdiff_and_lanczos(tesseract, tiny_pipeline_dir, tmp_path) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    hq.mkdir()
    lq.mkdir()
    image = PIL.Image.new("RGB", (128, 64), "white")
    PIL.ImageDraw.Draw(image).text((8, 12), "EXIT", font=_font(32), fill="black")
    image.save(hq / "exit.png")
    image.resize((64, 32), PIL.Image.BICUBIC).save(lq / "exit.png")
    truth = tmp_path / "texts.json"
    truth.write_text(json.dumps({"exit": "EXIT"}), encoding="utf-8")
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(tmp_path / "out"), "--metrics", "psnr", "--device", "cpu"]
    argv += ["--ocr", "tesseract", "--ocr-truth", str(truth), "--method", "lanczos"]
    argv += ["--method", f"faithdiff={tiny_pipeline_dir}", "--steps", "2", "--tile-size", "64", "--ocr-case-sensitive"]
    assert eval_cli.main(argv) == 0
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [r["method"] for r in rows] == ["lanczos", "faithdiff"]
    for row in rows:
        assert 0 <= row["word-acc"] <= 1 and row["cer"] >= 0 and 0 <= row["ned"] <= 1
    table = (tmp_path / "out" / "table.md").read_text()
    assert "on whole images" in table and "case-sensitive" in table


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("faithdiff-eval: error: ") and "Traceback" not in lines[0]
    return lines[0]


def _require_pytesseract() -> types.ModuleType:
    """pytesseract, or a skip where it is missing; under CI (whose test extra has it) a failure."""
    try:
        import pytesseract
    except ImportError as error:
        if os.environ.get("CI"):
            pytest.fail(f"pytesseract is not installed; CI must install the test extra, which has it ({error}).")
        pytest.skip(f"pytesseract is not installed here ({error}).")
    return pytesseract


@pytest.mark.parametrize(
    "case, expected",
    [
        ("backend", r"`--ocr` 'easyocr' is unknown; expected one of tesseract, paddleocr"),
        ("no-truth", r"`--ocr tesseract` needs ground-truth text: --ocr-truth FILE.json"),
        ("missing", r"ground-truth text .* lacks 1 image\(s\) of the set: shops"),
        ("not-json", r"ground-truth text .* is not JSON"),
        ("truth-alone", r"`--ocr-truth` is the ground truth of --ocr BACKEND or of a set built by --make-set"),
        ("lang-alone", r"`--ocr-lang` sets how --ocr reads; pass --ocr BACKEND"),
        ("no-pytesseract", r'--ocr tesseract needs pytesseract, .*pip install "faithdiff-pipeline\[ocr\]"'),
        ("no-program", r"--ocr tesseract needs the tesseract program, .*apt-get install tesseract-ocr"),
        ("no-language", r"tesseract has no data for language\(s\) xyz .*apt-get install tesseract-ocr-xyz"),
        ("no-paddleocr", r'--ocr paddleocr needs PaddleOCR 3, .*pip install "faithdiff-pipeline\[paddleocr\]"'),
        ("paddle-lang", r"`--ocr-lang` 'eng' sets tesseract's language"),
        ("before-set", r'--ocr paddleocr needs PaddleOCR 3, .*pip install "faithdiff-pipeline\[paddleocr\]"'),
    ],
)
def test_ocr_mistakes_are_one_line_before_any_model_loads(
    text_sources, tiny_pipeline_dir, tmp_path, monkeypatch, capsys, request, case, expected
) -> None:
    sources, _, manifest = text_sources
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    hq.mkdir()
    lq.mkdir()
    for path in sources.iterdir():
        with PIL.Image.open(path) as image:
            image.crop((0, 0, 384, 256)).save(hq / path.name)
            image.crop((0, 0, 384, 256)).resize((192, 128)).save(lq / path.name)
    argv = ["--hq", str(hq), "--lq", str(lq), "--out", str(tmp_path / "out"), "--metrics", "psnr"]
    argv += ["--method", f"faithdiff={tiny_pipeline_dir}", "--ocr", "tesseract", "--ocr-truth", str(manifest)]
    monkeypatch.setattr(eval_methods, "load_faithdiff", lambda *a, **k: pytest.fail("a model was loaded"))
    if case == "backend":
        argv[argv.index("tesseract")] = "easyocr"
    elif case == "no-truth":
        argv = argv[:-2]
    elif case == "missing":
        manifest.write_text(json.dumps({"signs": "HARBOUR"}), encoding="utf-8")
    elif case == "not-json":
        manifest.write_text("signs: HARBOUR", encoding="utf-8")
    elif case == "truth-alone":
        argv.remove("--ocr")
        argv.remove("tesseract")
    elif case == "lang-alone":
        argv = [*argv[: argv.index("--ocr")], "--ocr-lang", "deu"]
    elif case == "no-pytesseract":
        monkeypatch.setitem(sys.modules, "pytesseract", None)  # makes `import pytesseract` fail
    elif case == "no-program":
        monkeypatch.setattr(_require_pytesseract().pytesseract, "tesseract_cmd", str(tmp_path / "no" / "tesseract"))
    elif case == "no-language":
        request.getfixturevalue("tesseract")
        argv += ["--ocr-lang", "eng+xyz"]
    elif case == "no-paddleocr":
        monkeypatch.setitem(sys.modules, "paddleocr", None)
        argv[argv.index("tesseract")] = "paddleocr"
    elif case == "paddle-lang":
        argv[argv.index("tesseract")] = "paddleocr"
        argv += ["--ocr-lang", "eng"]
    elif case == "before-set":  # the engine is checked before a set is built
        monkeypatch.setitem(sys.modules, "paddleocr", None)
        argv = ["--make-set", str(sources), "--preset", "dasr-level3", "--set-dir", str(tmp_path / "set")]
        argv += ["--ocr-truth", str(manifest), "--ocr", "paddleocr", "--out", str(tmp_path / "out")]
    assert eval_cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert re.search(expected, line), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "set").exists()
