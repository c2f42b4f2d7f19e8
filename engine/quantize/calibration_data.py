"""Calibration data: batches of model inputs from arrays, an .npz file or a folder of images.

A :class:`CalibrationData` is a sized iterable of feed dicts (graph input name -> array), one
per batch. Batches are produced on demand (an image folder is read one batch at a time), so
calibrating never holds more than one batch of inputs.

:func:`validate` checks data against a model before anything runs: it rejects empty data,
unknown or missing input names, NaN/Inf (naming the input and the sample), shapes whose rank
or static dims differ from the model's declared input, and dtypes other than a float for a
float input (floats are cast silently). Every rejection is a :class:`CalibrationDataError`.
:func:`load_calibration_data` turns any accepted source into validated data for a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.shape_inference import declared_spec

#: Image file suffixes :meth:`CalibrationData.from_image_folder` reads (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Batch size used when neither the caller nor the model's batch dim fixes one.
DEFAULT_BATCH_SIZE = 8

Feeds = dict[str, np.ndarray]
#: A user preprocessing function: an opened Pillow image -> a CHW float array.
Preprocess = Callable[[Any], np.ndarray]


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used for a model; the message says why and where."""


@dataclass(frozen=True)
class CalibrationData:
    """A sized, re-iterable sequence of batches (feed dicts) for calibration.

    ``input_names``: the graph inputs every batch feeds; ``batch_starts``: the index of each
    batch's first sample (for messages); ``source``: where the data came from, for logs;
    ``load_batch(index)``: the batch; ``lazy``: batches are read from disk when asked for
    (so validation checks them as they are read instead of reading them twice). Use the
    ``from_*`` constructors rather than building one by hand.
    """

    input_names: tuple[str, ...]
    batch_starts: tuple[int, ...]
    source: str
    load_batch: Callable[[int], Feeds]
    lazy: bool = False

    def __len__(self) -> int:
        return len(self.batch_starts)

    def __iter__(self) -> Iterator[Feeds]:
        for index in range(len(self)):
            yield self.load_batch(index)

    def batch(self, index: int) -> Feeds:
        """The ``index``-th batch."""
        return self.load_batch(index)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_arrays(
        cls,
        arrays: Any,
        input_names: Sequence[str] | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
        source: str = "arrays",
    ) -> CalibrationData:
        """Batches from in-memory arrays.

        ``arrays`` is one array per input (a dict name -> array, a list matched with
        ``input_names``, or a single array for ``input_names[0]``) whose first axis counts
        samples, cut into batches of ``batch_size`` (the last one shorter unless
        ``drop_last``); or a list of feed dicts, each used as one batch as it is.
        """
        if isinstance(arrays, Sequence) and arrays and isinstance(arrays[0], Mapping):
            return cls._from_feed_list(arrays, source)
        named = _named_arrays(arrays, input_names)
        if batch_size < 1:
            raise CalibrationDataError(f"batch_size must be >= 1, got {batch_size}")
        counts = {name: (a.shape[0] if a.ndim else 0) for name, a in named.items()}
        if len(set(counts.values())) > 1:
            raise CalibrationDataError(
                f"calibration arrays ({source}) disagree on the number of samples: {counts}"
            )
        samples = next(iter(counts.values()), 0)
        stop = samples - samples % batch_size if drop_last else samples
        starts = tuple(range(0, stop, batch_size))

        def load(index: int) -> Feeds:
            begin = starts[index]
            return {name: array[begin : begin + batch_size] for name, array in named.items()}

        return cls(tuple(named), starts, source, load)

    @classmethod
    def _from_feed_list(
        cls, feeds_list: Sequence[Mapping[str, Any]], source: str
    ) -> CalibrationData:
        batches = [{name: np.asarray(v) for name, v in feeds.items()} for feeds in feeds_list]
        names = list(batches[0])
        starts: list[int] = []
        position = 0
        for index, feeds in enumerate(batches):
            if sorted(feeds) != sorted(names):
                raise CalibrationDataError(
                    f"batch {index} ({source}) feeds {sorted(feeds)}, batch 0 feeds {sorted(names)}"
                )
            starts.append(position)
            first = feeds[names[0]]
            position += int(first.shape[0]) if first.ndim else 1
        return cls(tuple(names), tuple(starts), source, lambda index: dict(batches[index]))

    @classmethod
    def from_npz(
        cls,
        path: str | Path,
        input_names: Sequence[str] | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
    ) -> CalibrationData:
        """Batches from an .npz file whose keys are input names (first axis: samples).

        With ``input_names`` given the file must hold exactly those keys.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as error:
            raise CalibrationDataError(f"cannot read calibration file {path}: {error}") from error
        if input_names is not None and sorted(arrays) != sorted(input_names):
            raise CalibrationDataError(
                f"calibration file {path} holds {sorted(arrays)}; expected the inputs "
                f"{sorted(input_names)}"
            )
        return cls.from_arrays(arrays, None, batch_size, drop_last, source=str(path))

    @classmethod
    def from_image_folder(
        cls,
        folder: str | Path,
        input_name: str,
        preprocess: Preprocess | None = None,
        batch_size: int = 1,
        image_size: tuple[int, int] | None = None,
        drop_last: bool = False,
    ) -> CalibrationData:
        """Batches of images from ``folder`` (sorted *.png, *.jpg, *.jpeg, *.bmp).

        Each file is opened with Pillow and passed to ``preprocess``, which returns a CHW
        float array; the default (:func:`default_preprocess`) converts to RGB, resizes to
        ``image_size`` (H, W) when given, and scales to [0, 1]. A batch stacks its images into
        ``[batch, C, H, W]`` float32 for ``input_name``; images are read batch by batch.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CalibrationDataError(f"calibration image folder {folder} does not exist")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if batch_size < 1:
            raise CalibrationDataError(f"batch_size must be >= 1, got {batch_size}")
        function = preprocess if preprocess is not None else default_preprocess(image_size)
        stop = len(files) - len(files) % batch_size if drop_last else len(files)
        starts = tuple(range(0, stop, batch_size))

        def load(index: int) -> Feeds:
            begin = starts[index]
            images = [_load_image(path, function) for path in files[begin : begin + batch_size]]
            shapes = {image.shape for image in images}
            if len(shapes) > 1:
                raise CalibrationDataError(
                    f"images {begin}..{begin + len(images) - 1} of {folder} preprocess to "
                    f"different shapes {sorted(shapes)}; resize them (image_size or preprocess)"
                )
            return {input_name: np.stack(images).astype(np.float32, copy=False)}

        return cls((input_name,), starts, str(folder), load, lazy=True)


def default_preprocess(image_size: tuple[int, int] | None = None) -> Preprocess:
    """RGB, resized to ``image_size`` = (H, W) if given (bilinear), scaled to [0, 1], CHW."""

    def preprocess(image: Any) -> np.ndarray:
        from PIL import Image

        rgb = image.convert("RGB")
        if image_size is not None:
            height, width = image_size
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return (np.asarray(rgb, dtype=np.float32) / 255.0).transpose(2, 0, 1)

    return preprocess


def _load_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(preprocess(image))
    except (OSError, UnidentifiedImageError) as error:
        raise CalibrationDataError(f"cannot read calibration image {path}: {error}") from error
    if array.ndim != 3:
        raise CalibrationDataError(
            f"preprocessing {path} gave shape {list(array.shape)}; expected a CHW array"
        )
    return array


def _named_arrays(arrays: Any, input_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    if isinstance(arrays, Mapping):
        named = {str(name): np.asarray(a) for name, a in arrays.items()}
    else:
        listed = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        if input_names is None or len(input_names) != len(listed):
            raise CalibrationDataError(
                f"{len(listed)} calibration array(s) need as many input names, got "
                f"{None if input_names is None else list(input_names)}"
            )
        named = {name: np.asarray(a) for name, a in zip(input_names, listed)}
    if input_names is not None and sorted(named) != sorted(input_names):
        raise CalibrationDataError(
            f"calibration arrays are named {sorted(named)}; expected {sorted(input_names)}"
        )
    return named


# ---------------------------------------------------------------------- validation


def model_data_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs calibration must feed (inputs backed by an initializer excluded)."""
    initializers = set(model.graph.initializers.values())
    return [v for v in model.graph.inputs if v not in initializers and v.const_value is None]


def validate(
    data: CalibrationData,
    model_inputs: ir.Model | Sequence[ir.Value],
    eager: bool | None = None,
) -> CalibrationData:
    """Check ``data`` against the model's inputs; returns data whose batches are cast.

    Names and emptiness are checked at once. Every batch the returned data yields is checked
    (shape, dtype, finiteness) and float batches are cast to the input's float dtype; with
    ``eager`` every batch is also loaded and checked now. By default that happens unless the
    data is ``lazy`` (read from disk: it is then checked once, while calibrating reads it).
    """
    if isinstance(model_inputs, ir.Model):
        model_inputs = model_data_inputs(model_inputs)
    by_name = {v.name: v for v in model_inputs}
    where = f"calibration data ({data.source})"
    if len(data) == 0:
        raise CalibrationDataError(f"{where} is empty: it holds no batch of samples")
    unknown = sorted(set(data.input_names) - set(by_name))
    missing = sorted(set(by_name) - set(data.input_names))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        if missing:
            parts.append(f"missing input(s) {missing}")
        raise CalibrationDataError(
            f"{where}: {' and '.join(parts)}; the model's inputs are {sorted(by_name)}"
        )

    def load(index: int) -> Feeds:
        feeds = data.load_batch(index)
        start = data.batch_starts[index]
        checked: Feeds = {}
        for name, array in feeds.items():
            if name not in by_name:
                raise CalibrationDataError(f"{where}, batch {index}: unknown input '{name}'")
            checked[name] = check_array(by_name[name], array, f"{where}, batch {index}", start)
        absent = sorted(set(by_name) - set(checked))
        if absent:
            raise CalibrationDataError(f"{where}, batch {index}: missing input(s) {absent}")
        return checked

    validated = CalibrationData(data.input_names, data.batch_starts, data.source, load, data.lazy)
    if eager if eager is not None else not data.lazy:
        for index in range(len(validated)):
            validated.load_batch(index)
    return validated


def check_array(value: ir.Value, given: Any, where: str, first_sample: int = 0) -> np.ndarray:
    """One input's array checked against its declaration (see :func:`validate`)."""
    array = np.asarray(given)
    name = value.name
    spec = declared_spec(value, constant_limit=0)
    expected = spec.dtype
    if expected is not None and expected != ir.DataType.STRING:
        want = np.dtype(expected.numpy())
        if array.dtype != want:
            if _is_float(want) and _is_float(array.dtype):
                array = array.astype(want)
            else:
                raise CalibrationDataError(
                    f"{where}: input '{name}' has dtype {array.dtype}, the model expects "
                    f"{want} (float data is cast to a float input; other dtypes are refused)"
                )
    if spec.shape is not None:
        text = "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in spec.shape) + "]"
        wrong_rank = len(spec.shape) != array.ndim
        wrong_dim = not wrong_rank and any(
            isinstance(dim, int) and dim != got for dim, got in zip(spec.shape, array.shape)
        )
        if wrong_rank or wrong_dim:
            raise CalibrationDataError(
                f"{where}: input '{name}' has shape {list(array.shape)}, the model expects {text}"
            )
    if _is_float(array.dtype):
        finite = np.isfinite(array)
        if not finite.all():
            first = np.unravel_index(int(np.flatnonzero(~finite)[0]), array.shape)
            kind = "NaN" if np.isnan(array[first]) else "Inf"
            sample = first_sample + int(first[0]) if array.ndim else first_sample
            count = int(array.size - finite.sum())
            raise CalibrationDataError(
                f"{where}: input '{name}' holds {count} non-finite value(s); the first is "
                f"{kind} in sample {sample} at index {[int(i) for i in first]}"
            )
    return array


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


# ---------------------------------------------------------------------- any source


def load_calibration_data(
    source: Any,
    model: ir.Model,
    batch_size: int | None = None,
    preprocess: Preprocess | None = None,
) -> CalibrationData:
    """Validated calibration data for ``model`` from any supported ``source``.

    ``source``: a :class:`CalibrationData`; a path to an .npz file (keys = input names) or to
    a folder of images (single image-input models; ``preprocess`` or the default one with
    the model's H, W); an ndarray (single-input models); a dict input name -> array (first
    axis: samples); or a list of feed dicts (one batch each). ``batch_size`` defaults to the
    model's static batch dim (then a short last batch is dropped), else 8.
    """
    inputs = model_data_inputs(model)
    names = [v.name for v in inputs]
    static_batch = _static_batch(inputs)
    size = batch_size or static_batch or DEFAULT_BATCH_SIZE
    drop_last = static_batch is not None
    if isinstance(source, CalibrationData):
        data = source
    elif isinstance(source, (str, Path)):
        data = _from_path(Path(source), inputs, size, drop_last, preprocess)
    elif isinstance(source, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationDataError(
                f"a single calibration array needs a single-input model; this one has the "
                f"inputs {names} (pass a dict input name -> array)"
            )
        data = CalibrationData.from_arrays(source, names, size, drop_last)
    elif isinstance(source, Mapping):
        data = CalibrationData.from_arrays(dict(source), None, size, drop_last)
    elif isinstance(source, Sequence) and not source:
        raise CalibrationDataError("calibration data (an empty list) is empty")
    elif isinstance(source, Sequence) and all(isinstance(f, Mapping) for f in source):
        data = CalibrationData.from_arrays(list(source))
    else:
        raise CalibrationDataError(
            f"unsupported calibration data of type {type(source).__name__}: give an .npz "
            "path, an image folder, an array, a dict of arrays or a list of feed dicts"
        )
    return validate(data, inputs)


def _static_batch(inputs: Sequence[ir.Value]) -> int | None:
    for value in inputs:
        shape = declared_spec(value, constant_limit=0).shape
        if shape and isinstance(shape[0], int):
            return shape[0]
    return None


def _from_path(
    path: Path,
    inputs: Sequence[ir.Value],
    batch_size: int,
    drop_last: bool,
    preprocess: Preprocess | None,
) -> CalibrationData:
    names = [v.name for v in inputs]
    if path.is_dir():
        if len(inputs) != 1:
            raise CalibrationDataError(
                f"an image folder ({path}) needs a single-input model; this one has {names}"
            )
        shape = declared_spec(inputs[0], constant_limit=0).shape
        size = None
        if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
            size = (int(shape[2]), int(shape[3]))
        return CalibrationData.from_image_folder(
            path, names[0], preprocess, batch_size, size, drop_last
        )
    if not path.exists():
        raise CalibrationDataError(f"calibration data {path} does not exist")
    if path.suffix.lower() != ".npz":
        raise CalibrationDataError(
            f"calibration data {path} is neither an .npz file nor a folder of images"
        )
    return CalibrationData.from_npz(path, None, batch_size, drop_last)
