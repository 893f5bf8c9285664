"""OCR engines behind one small interface: tesseract (through pytesseract) and PaddleOCR 3.

A backend reads text from PIL images in two ways: :meth:`OcrBackend.read_word` for the crop of one ground-truth
word box, :meth:`OcrBackend.read_page` for a whole image. Creating one only checks that the engine is installed
(cheap, so that ``faithdiff-eval`` stops at once when it is not); :meth:`OcrBackend.load` then loads its models.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import PIL.Image

OCR_BACKENDS = ("tesseract", "paddleocr")
OCR_EXTRA = 'pip install "faithdiff-pipeline[ocr]"'
PADDLEOCR_EXTRA = 'pip install "faithdiff-pipeline[paddleocr]"'
PADDLE_INSTALL = "https://www.paddlepaddle.org.cn/install"
TESSERACT_INSTALL = "apt-get install tesseract-ocr on Debian and Ubuntu, brew install tesseract on macOS"


class OcrUnavailableError(RuntimeError):
    """An OCR engine, its program or its language data is not installed."""


class OcrBackend(ABC):
    """Reads text in images. Subclasses set :attr:`name` and implement the two readers."""

    name: str

    def load(self, words: bool) -> None:
        """Loads what reading needs: a word recogniser when ``words``, a detector and recogniser otherwise (nothing
        for an engine without models to load, such as tesseract).

        Raises:
            OcrUnavailableError: the models cannot be loaded.
        """

    @abstractmethod
    def read_word(self, image: PIL.Image.Image) -> str:
        """The text of ``image``, the crop of one word (or one line) of text."""

    @abstractmethod
    def read_page(self, image: PIL.Image.Image) -> str:
        """All the text of ``image``, in reading order, lines separated by whitespace."""

    @abstractmethod
    def describe(self) -> str:
        """The engine, its version and settings, for reports."""


class TesseractBackend(OcrBackend):
    """Tesseract through pytesseract: ``--psm 7`` (one text line) for word crops, ``--psm 3`` (automatic page
    segmentation, its default) for whole images, with tesseract's LSTM engine.

    Args:
        language: Tesseract's language code(s), ``+``-separated (``"eng"``, ``"eng+deu"``); their data must be
            installed (Debian's ``tesseract-ocr`` package ships ``eng``).
        min_word_height: Word crops lower than this many pixels are enlarged to it (LANCZOS) before reading,
            because tesseract misreads text only a few pixels high; every method's crops get the same treatment.

    Raises:
        OcrUnavailableError: pytesseract, the ``tesseract`` program or the language's data is missing.
    """

    name = "tesseract"

    def __init__(self, language: str = "eng", min_word_height: int = 40) -> None:
        if not isinstance(language, str) or not language.strip("+"):
            raise ValueError(f"`language` must be tesseract language codes such as 'eng', got {language!r}.")
        if isinstance(min_word_height, bool) or not isinstance(min_word_height, int) or min_word_height < 1:
            raise ValueError(f"`min_word_height` must be a positive integer, got {min_word_height!r}.")
        self._pytesseract = _import_pytesseract()
        try:
            self.version = str(self._pytesseract.get_tesseract_version())
            installed = set(self._pytesseract.get_languages(config=""))
        except self._pytesseract.TesseractNotFoundError as error:
            raise OcrUnavailableError(
                f"--ocr tesseract needs the tesseract program, which is not installed or not on PATH "
                f"({TESSERACT_INSTALL})."
            ) from error
        absent = [code for code in language.split("+") if code and code not in installed]
        if absent:
            raise OcrUnavailableError(
                f"tesseract has no data for language(s) {', '.join(absent)} (installed: "
                f"{', '.join(sorted(installed)) or 'none'}); on Debian and Ubuntu, apt-get install "
                f"{' '.join('tesseract-ocr-' + code for code in absent)}."
            )
        self.language = language
        self.min_word_height = min_word_height

    def read_word(self, image: PIL.Image.Image) -> str:
        if image.height < self.min_word_height:
            width = max(1, round(image.width * self.min_word_height / image.height))
            image = image.resize((width, self.min_word_height), PIL.Image.LANCZOS)
        return self._read(image, "--psm 7")

    def read_page(self, image: PIL.Image.Image) -> str:
        return self._read(image, "--psm 3")

    def _read(self, image: PIL.Image.Image, config: str) -> str:
        text = self._pytesseract.image_to_string(image.convert("RGB"), lang=self.language, config=f"--oem 1 {config}")
        # Tesseract ends its output with a line break (and a form feed for pages).
        return text.strip()

    def describe(self) -> str:
        return f"tesseract {self.version} ({self.language})"


def _import_pytesseract() -> Any:
    try:
        return importlib.import_module("pytesseract")
    except ImportError as error:
        raise OcrUnavailableError(
            f"--ocr tesseract needs pytesseract, which is not installed: {OCR_EXTRA} ({error})."
        ) from error


class PaddleOcrBackend(OcrBackend):
    """PaddleOCR 3.x: its ``TextRecognition`` model for word crops, its ``PaddleOCR`` pipeline (text detection then
    recognition, without the document-orientation, unwarping and text-line-orientation stages) for whole images.

    The defaults are the PP-OCRv3 English models: the FaithDiff paper reads RoadText with "PaddleOCR v3".

    Args:
        device: PaddlePaddle's device: ``"cpu"``, ``"gpu:0"``, ...
        detection_model: A PaddleOCR text-detection model name (whole images).
        recognition_model: A PaddleOCR text-recognition model name (word crops and whole images).

    Raises:
        OcrUnavailableError: PaddleOCR 3 or PaddlePaddle is not installed.
    """

    name = "paddleocr"

    def __init__(
        self,
        device: str = "cpu",
        detection_model: str = "PP-OCRv3_mobile_det",
        recognition_model: str = "en_PP-OCRv3_mobile_rec",
    ) -> None:
        self._paddleocr = _import_paddleocr()
        self.version = str(getattr(self._paddleocr, "__version__", "unknown"))
        self.device = device
        self.detection_model = detection_model
        self.recognition_model = recognition_model
        self._recognizer: Any = None
        self._pipeline: Any = None

    def load(self, words: bool) -> None:
        try:
            if words:
                self._recognizer = self._paddleocr.TextRecognition(
                    model_name=self.recognition_model, device=self.device
                )
            else:
                self._pipeline = self._paddleocr.PaddleOCR(
                    text_detection_model_name=self.detection_model,
                    text_recognition_model_name=self.recognition_model,
                    use_doc_orientation_classify=False,
                    use_doc_unwarping=False,
                    use_textline_orientation=False,
                    device=self.device,
                )
        except Exception as error:  # PaddleX raises many kinds of errors when models cannot be fetched or built
            models = self.recognition_model if words else f"{self.detection_model} + {self.recognition_model}"
            first = str(error).splitlines()[0] if str(error) else ""
            raise OcrUnavailableError(f"PaddleOCR could not load {models}: {type(error).__name__}: {first}") from error

    def read_word(self, image: PIL.Image.Image) -> str:
        (result,) = self._loaded(self._recognizer, True).predict(input=_bgr(image), batch_size=1)
        return str(result["rec_text"])

    def read_page(self, image: PIL.Image.Image) -> str:
        (result,) = self._loaded(self._pipeline, False).predict(_bgr(image))
        return " ".join(str(text) for text in result["rec_texts"])

    def _loaded(self, model: Any, words: bool) -> Any:
        if model is None:
            self.load(words)
            model = self._recognizer if words else self._pipeline
        return model

    def describe(self) -> str:
        return f"PaddleOCR {self.version} ({self.detection_model} + {self.recognition_model})"


def _bgr(image: PIL.Image.Image) -> np.ndarray:
    """``image`` as the ``[H, W, 3]`` uint8 array PaddleOCR takes: channels in OpenCV's BGR order."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])


def _import_paddleocr() -> Any:
    try:
        module = importlib.import_module("paddleocr")
    except ImportError as error:
        raise OcrUnavailableError(
            f"--ocr paddleocr needs PaddleOCR 3, which is not installed: {PADDLEOCR_EXTRA}, and PaddlePaddle 3 "
            f"({PADDLE_INSTALL}) ({error})."
        ) from error
    version = str(getattr(module, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 3:
        raise OcrUnavailableError(
            f"--ocr paddleocr needs PaddleOCR 3 (its predict() API), found version {version}: {PADDLEOCR_EXTRA}."
        )
    if importlib.util.find_spec("paddle") is None:
        raise OcrUnavailableError(
            f"--ocr paddleocr needs PaddlePaddle 3, which is not installed; see {PADDLE_INSTALL} for the build "
            "that suits the machine."
        )
    return module


def paddle_device(device: str) -> str:
    """PaddlePaddle's name for a torch device name: ``cuda`` and ``cuda:N`` become ``gpu:0`` and ``gpu:N``; any
    other device (``cpu``, ``mps``) runs PaddleOCR on the CPU."""
    kind, _, index = device.partition(":")
    return f"gpu:{index or 0}" if kind == "cuda" else "cpu"


def create_backend(name: str, device: str = "cpu", language: str | None = None) -> OcrBackend:
    """The backend called ``name`` (one of :data:`OCR_BACKENDS`), checked to be installed but not loaded yet.

    Args:
        name: ``"tesseract"`` or ``"paddleocr"``.
        device: The torch device name of the run (``"cpu"``, ``"cuda:1"``); PaddleOCR runs there, tesseract on the
            CPU.
        language: Tesseract's language codes (default ``"eng"``); PaddleOCR's language is that of its models.

    Raises:
        ValueError: ``name`` is unknown, or ``language`` is given to PaddleOCR.
        OcrUnavailableError: the engine is not installed.
    """
    if name == "tesseract":
        return TesseractBackend("eng" if language is None else language)
    if name == "paddleocr":
        if language is not None:
            raise ValueError(
                f"`--ocr-lang` {language!r} sets tesseract's language; PaddleOCR reads the language of its models "
                "(English PP-OCRv3 by default)."
            )
        return PaddleOcrBackend(paddle_device(device))
    raise ValueError(f"`--ocr` {name!r} is unknown; expected one of {', '.join(OCR_BACKENDS)}.")
