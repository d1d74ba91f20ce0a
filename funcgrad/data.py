"""The book's data sets, all local (never a download): spiral, vertical and sine, generated; Fashion-MNIST, read.

- :func:`spiral`, :func:`vertical` and :func:`sine` are generated here.
- :func:`fashion_mnist` (chapter 19) reads the Fashion-MNIST files you have downloaded yourself: Zalando's IDX
  files (plain or ``.gz``) or the book's folder of PNGs; it never downloads them.

Two ways to draw the generated ones:

- From a JAX key or an int seed (default): ``spiral(100, 3, key=0)``. Deterministic, jit-free, any size.
- ``exact=True``: bit for bit what the ``nnfs`` package gives after ``nnfs.init()`` (NumPy's
  ``RandomState(seed)``, float32 normal draws, float32 storage), so readers can compare numbers with the
  book's code. :class:`NNFSRandom` continues that stream the way the book's scripts do: data first, then
  each dense layer's ``0.01·randn`` weights, then validation data.

Both return ``(X, y)`` as JAX arrays: X float32 of shape (samples·classes, 2), y int32 class labels.
:func:`fashion_mnist` returns ``(X, y)`` too: X float32 of shape (n, 784), scaled to [-1, 1] as in the book.

Example:
    >>> import funcgrad as fg
    >>> X, y = fg.data.spiral(100, 3, key=0, exact=True)
    >>> X.shape, y.shape, X[0].tolist()
    ((300, 2), (300,), [0.0, 0.0])
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad._checks import as_shape, describe, is_key
from funcgrad._io import FileError, open_regular, read_regular

__all__ = ["spiral", "vertical", "sine", "fashion_mnist", "NNFSRandom", "as_key"]


def as_key(key: Any, where: str = "key") -> jax.Array:
    """An int seed or a PRNG key -> a PRNG key."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if is_key(key):
        return key
    raise TypeError(f"{where} must be an int seed or a PRNG key from jax.random.key(seed); got {describe(key)}")


def _check_counts(samples: Any, classes: Any, where: str) -> tuple[int, int]:
    for name, value, low in (("samples", samples, 1), ("classes", classes, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{where}: {name} must be an int >= {low}; got {value!r}")
    return int(samples), int(classes)


def _labels(samples: int, classes: int) -> jax.Array:
    return jnp.repeat(jnp.arange(classes, dtype=jnp.int32), samples)


def spiral(samples: int, classes: int, key: Any = 0, *, exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """Spiral arms, one per class (CS231n's, as in the book).

    For class c, ``r = linspace(0, 1, samples)``, ``t = linspace(4c, 4(c+1), samples) + 0.2·N(0, 1)``, and
    the points are ``(r·sin 2.5t, r·cos 2.5t)``. The first point of every class is exactly (0, 0).

    Args:
        samples: points per class.
        classes: number of classes (spiral arms).
        key: an int seed or a PRNG key. With ``exact=True`` an int seed for NumPy's RandomState.
        exact: reproduce the ``nnfs`` package's data bit for bit (see :class:`NNFSRandom`).
    """
    samples, classes = _check_counts(samples, classes, "spiral")
    if exact:
        X, y = NNFSRandom(_exact_seed(key, "spiral")).spiral(samples, classes)
        return jnp.asarray(X), jnp.asarray(y, jnp.int32)
    noise = jax.random.normal(as_key(key), (classes, samples), jnp.float32) * 0.2
    r = jnp.linspace(0.0, 1.0, samples, dtype=jnp.float32)
    c = jnp.arange(classes, dtype=jnp.float32)[:, None]
    t = 4 * c + 4 * r[None, :] + noise  # == linspace(4c, 4(c+1), samples) + noise
    points = jnp.stack([r[None, :] * jnp.sin(2.5 * t), r[None, :] * jnp.cos(2.5 * t)], axis=-1).reshape(-1, 2)
    return points, _labels(samples, classes)


def vertical(samples: int, classes: int, key: Any = 0, *, exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """Vertical clusters: class c has ``x = 0.1·N(0, 1) + c/3``, ``y = 0.1·N(0, 1) + 0.5``."""
    samples, classes = _check_counts(samples, classes, "vertical")
    if exact:
        X, y = NNFSRandom(_exact_seed(key, "vertical")).vertical(samples, classes)
        return jnp.asarray(X), jnp.asarray(y, jnp.int32)
    noise = jax.random.normal(as_key(key), (classes, samples, 2), jnp.float32) * 0.1
    centre = jnp.stack([jnp.arange(classes, dtype=jnp.float32) / 3, jnp.full((classes,), 0.5)], axis=-1)
    return (noise + centre[:, None, :]).reshape(-1, 2), _labels(samples, classes)


def sine(samples: int = 1000, *, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The book's regression data: ``X = arange(samples)/samples`` as a column, ``y = sin(2πX)``; no randomness.

    Computed in float64 and cast to ``dtype``, as the ``nnfs`` package computes it (in float64)."""
    if not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"sine: samples must be an int >= 1; got {samples!r}")
    X = np.arange(samples).reshape(-1, 1) / samples
    y = np.sin(2 * np.pi * X)
    return jnp.asarray(X, dtype), jnp.asarray(y, dtype)


# Fashion-MNIST (chapter 19), read from files the user has downloaded: never downloaded here.

_FASHION_HELP = (
    "Get Zalando's IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) from https://github.com/zalandoresearch/fashion-mnist (folder data/fashion), or the "
    "book's PNG images from https://nnfs.io/datasets/fashion_mnist_images.zip (extract it and pass the folder that "
    "holds train/ and test/). funcgrad never downloads data at run time: download the files yourself, then pass "
    "their folder."
)
_FASHION_FOLDERS = ("", "fashion_mnist_images", "FashionMNIST/raw", "data/fashion")  # looked in, under path, in order
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 dimensions / 1 dimension
_SIDE = 28  # Fashion-MNIST's images are 28×28
_CLASSES = 10
_IDX_MAX_BYTES = 1 << 28  # most an IDX file (or its decompressed data) may hold; Fashion-MNIST's largest: 47 MB
_PNG_MAX_BYTES = 1 << 20  # most one of the book's PNGs may hold; they are under 1 KB


def fashion_mnist(
    path: str | os.PathLike[str], split: str = "train", *, flatten: bool = True, scale: str | None = "book",
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Fashion-MNIST (chapter 19) from local files: ``(X, y)``, X float32 images, y int32 labels 0..9.

    Nothing is ever downloaded: ``path`` is a folder holding files you have fetched yourself, in either layout:

    - Zalando's IDX files, as distributed at https://github.com/zalandoresearch/fashion-mnist (folder
      ``data/fashion``): ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
      and ``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``); a plain file is read before a ``.gz`` one.
    - The book's PNGs (https://nnfs.io/datasets/fashion_mnist_images.zip, extracted): ``train/<label>/*.png`` and
      ``test/<label>/*.png``, one folder per label named ``0`` to ``9``. Each image must be a 28×28 8-bit
      grayscale PNG (Pillow's mode ``L``), as the book's are; any other image (RGB, palette, 16-bit, another
      size) is refused with an error naming the file rather than converted, since a conversion would change the
      pixel values silently. Needs Pillow (imported only here).

    These are looked for in ``path`` itself, then in ``path/fashion_mnist_images`` (the book's folder),
    ``path/FashionMNIST/raw`` (torchvision's) and ``path/data/fashion`` (a clone of Zalando's repository); in each
    folder the IDX files before the PNGs. The first folder holding the split's data is read.

    Order: an IDX file's own order; for PNGs, label folder by label folder (0 to 9), each in file-name order
    (the book lists folders in whatever order the file system gives, then shuffles).

    Preprocessing, with the pixels as float32 (float64 for a 64-bit ``dtype``), then cast to ``dtype``:

    - ``scale="book"`` (default): the book's ``X = (X - 127.5) / 127.5``, in [-1, 1].
    - ``scale="unit"``: ``X / 255``, in [0, 1].
    - ``scale=None``: the raw pixels 0..255, as floats.

    Args:
        path: a folder, as a str or a :class:`pathlib.Path` (``~`` is expanded).
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000; Zalando's ``t10k`` files).
        flatten: X of shape (n, 784), as the book feeds its dense layers; ``False``: (n, 28, 28).
        scale: ``"book"``, ``"unit"`` or ``None`` (see above).
        dtype: a floating dtype for X (float64 needs JAX's 64-bit mode).

    Raises:
        FileNotFoundError: no data for the split under ``path``; the message says what was looked for, where,
            and where to download it.
        ValueError: (``funcgrad._io.FileError``) a file that is not what it should be, named in the message: a
            wrong magic number, a truncated or overlong file, image and label counts that differ, a label outside
            0..9, an image that is not 28×28 grayscale, a FIFO or a device in place of a file.
        TypeError, ValueError: a bad argument, named in the message.

    Example (needs the real data, so not run as a test):
        >>> import funcgrad as fg
        >>> X, y = fg.data.fashion_mnist("fashion_mnist_images")  # doctest: +SKIP
        >>> X.shape, X.dtype, y.shape, float(X.min()), float(X.max())  # doctest: +SKIP
        ((60000, 784), dtype('float32'), (60000,), -1.0, 1.0)
        >>> X_test, y_test = fg.data.fashion_mnist("fashion_mnist_images", "test")  # doctest: +SKIP
    """
    root, dt = _check_fashion_args(path, split, flatten, scale, dtype)
    images, labels = _read_fashion(root, split)
    X: np.ndarray = images.astype(np.float64 if dt.itemsize > 4 else np.float32)
    if scale == "book":
        X = (X - 127.5) / 127.5  # the book's line; a Python float keeps X's dtype
    elif scale == "unit":
        X = X / 255
    if flatten:
        X = X.reshape(X.shape[0], -1)
    return jnp.asarray(X, dt), jnp.asarray(labels, jnp.int32)


def _given(value: Any) -> str:
    return repr(value) if value is None or isinstance(value, str) else describe(value)


def _check_fashion_args(path: Any, split: Any, flatten: Any, scale: Any, dtype: Any) -> tuple[Path, np.dtype]:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"fashion_mnist: path must be a folder, as a str or a pathlib.Path; got {_given(path)}")
    if not os.fspath(path):
        raise ValueError("fashion_mnist: path must name a folder; got the empty string ''")
    if not isinstance(split, str) or split not in _IDX_PREFIX:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test'; got {_given(split)}")
    if not isinstance(flatten, bool):
        raise TypeError(f"fashion_mnist: flatten must be True or False; got {_given(flatten)}")
    if not (scale is None or (isinstance(scale, str) and scale in ("book", "unit"))):
        raise ValueError(
            "fashion_mnist: scale must be 'book' ((X - 127.5) / 127.5, in [-1, 1]), 'unit' (X / 255, in [0, 1]) or "
            f"None (raw 0..255); got {_given(scale)}"
        )
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"fashion_mnist: dtype must be a floating dtype such as jnp.float32; got {_given(dtype)}")
    return Path(path).expanduser(), dt


def _read_fashion(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's raw images (uint8, (n, 28, 28)) and labels (int32), from the first folder that holds them."""
    if not root.is_dir():
        what = "is a file, not a folder (extract an archive first)" if root.exists() else "does not exist"
        raise FileNotFoundError(f"fashion_mnist: {root} {what}. {_FASHION_HELP}")
    prefix = _IDX_PREFIX[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    folders = [root / sub if sub else root for sub in _FASHION_FOLDERS]
    for folder in folders:
        images, labels = (_idx_file(folder, name) for name in names)
        if images is not None and labels is not None:
            return _read_idx_pair(images, labels)
        if images is not None or labels is not None:
            have, lack = (images, names[1]) if images is not None else (labels, names[0])
            raise FileNotFoundError(f"fashion_mnist: {folder} holds {have} but not {lack} (plain or .gz). {_FASHION_HELP}")
        if (folder / split).is_dir():
            return _read_png_split(folder / split)
    raise FileNotFoundError(
        f"fashion_mnist: no Fashion-MNIST {split} data under {root}: looked in {', '.join(map(str, folders))} for the "
        f"IDX files {names[0]} and {names[1]} (plain or .gz) and for the book's PNGs, {split}/<label>/*.png. "
        f"{_FASHION_HELP}"
    )


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if os.path.lexists(candidate):  # anything there (a FIFO, a broken link) is read, and refused by name
            return candidate
    return None


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_path, _IDX_IMAGES, "images")
    labels = _read_idx(labels_path, _IDX_LABELS, "labels")
    if images.shape[0] != labels.shape[0]:
        raise FileError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; the two "
            "files must be the same split's, whole"
        )
    bad = np.flatnonzero(labels >= _CLASSES)
    if bad.size:
        raise FileError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]}; Fashion-MNIST's labels are 0..9")
    return images, labels.astype(np.int32)


def _read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """An IDX file of unsigned bytes, plain or gzipped, checked against its header (magic, dimensions, size)."""
    head_size = 4 + 4 * (magic & 0xFF)
    if path.name.endswith(".gz"):
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > _IDX_MAX_BYTES:
                raise FileError(f"{path}: more than the {_IDX_MAX_BYTES} bytes a Fashion-MNIST file can have")
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    head = gz.read(head_size)
                    dims, size = _idx_header(path, head, magic, what)
                    if size > _IDX_MAX_BYTES:
                        raise FileError(f"{path}: its header declares {size} bytes of data, more than the "
                                        f"{_IDX_MAX_BYTES} a Fashion-MNIST file can have")
                    data = gz.read(size + 1)  # bounded: a gzip bomb is refused after size + 1 bytes
            except (OSError, EOFError, zlib.error) as e:
                raise FileError(f"{path}: not a readable gzip file ({e}); the file is corrupt or truncated") from None
        got, where = len(data), "decompressed data"
    else:
        raw = read_regular(path, _IDX_MAX_BYTES)
        dims, size = _idx_header(path, raw[:head_size], magic, what)
        data, got, where = raw[head_size:], len(raw) - head_size, "data"
    if got != size:
        shape = "×".join(map(str, dims))
        fault = "truncated (an interrupted download?)" if got < size else "corrupt: longer than its header says"
        raise FileError(f"{path}: {got} bytes of {where} after the header, which declares {shape} = {size} bytes; "
                        f"the file is {fault}")
    return np.frombuffer(data, np.uint8, size).reshape(dims)


def _idx_header(path: Path, head: bytes, magic: int, what: str) -> tuple[tuple[int, ...], int]:
    """(dims, bytes of data) from an IDX header, checked: magic number, Fashion-MNIST's 28×28 images, not empty."""
    ndim = magic & 0xFF
    if len(head) < 4 + 4 * ndim:
        raise FileError(f"{path}: {len(head)} bytes, too short for an IDX {what} header ({4 + 4 * ndim} bytes); the "
                        "file is truncated or not an IDX file")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        other = {_IDX_IMAGES: "images", _IDX_LABELS: "labels"}.get(found)
        hint = f" (that of an IDX {other} file: are the files swapped?)" if other else ""
        raise FileError(f"{path}: magic number 0x{found:08X}{hint}, but an IDX {what} file of unsigned bytes starts "
                        f"with 0x{magic:08X}; the file is corrupt or not Fashion-MNIST's")
    dims = tuple(int(d) for d in np.frombuffer(head, ">u4", ndim, 4))
    if what == "images" and dims[1:] != (_SIDE, _SIDE):
        raise FileError(f"{path}: images of {dims[1]}×{dims[2]} pixels; Fashion-MNIST's are {_SIDE}×{_SIDE}")
    if dims[0] == 0:
        raise FileError(f"{path}: holds no {what}")
    return dims, int(np.prod(dims, dtype=np.int64))


def _read_png_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The book's ``<split>/<label>/*.png``: label folders 0..9 in order, each in file-name order."""
    try:
        from PIL import Image  # noqa: PLC0415 - only the book's PNG layout needs Pillow
    except ImportError:
        raise ImportError(
            f"fashion_mnist: {folder} holds the book's PNG images, and reading them needs Pillow (pip install pillow); "
            "or use Zalando's IDX files from https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
        ) from None
    files, labels = _png_files(folder)
    images = np.empty((len(files), _SIDE, _SIDE), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge declared size: refused, not decoded
        for i, file in enumerate(files):
            images[i] = _decode_png(Image, file)
    return images, np.asarray(labels, np.int32)


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _png_files(folder: Path) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for sub in _visible(folder):
        if not (sub.name in {str(c) for c in range(_CLASSES)} and sub.is_dir()):
            raise FileError(f"{sub}: unexpected in {folder}, which should hold one folder per label, named 0 to 9")
        for file in _visible(sub):
            if not file.name.lower().endswith(".png"):
                raise FileError(f"{file}: not a .png file; {sub} should hold only the PNG images of label {sub.name}")
            files.append(file)
            labels.append(int(sub.name))
    if not files:
        raise FileNotFoundError(f"fashion_mnist: {folder} holds no PNG images in label folders 0..9. {_FASHION_HELP}")
    return files, labels


def _decode_png(Image: Any, file: Path) -> np.ndarray:
    """One of the book's images: a 28×28 8-bit grayscale PNG (mode L), else an error naming the file."""
    data = read_regular(file, _PNG_MAX_BYTES)
    pixels = None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            size, mode = img.size, img.mode
            if size == (_SIDE, _SIDE) and mode == "L":
                pixels = np.asarray(img, np.uint8)
    except Exception as e:  # noqa: BLE001 - Pillow's errors for a broken file: OSError, SyntaxError, bomb errors...
        raise FileError(f"{file}: not a readable PNG image ({type(e).__name__}: {e})") from None
    if pixels is None:
        raise FileError(f"{file}: a {size[0]}×{size[1]} image of mode {mode}; the book's images are "
                        f"{_SIDE}×{_SIDE} 8-bit grayscale (mode L), and other images are refused, not converted")
    return pixels


def _exact_seed(key: Any, where: str) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    raise TypeError(f"{where}(exact=True): key must be an int seed for NumPy's RandomState; got {describe(key)}")


class NNFSRandom:
    """The ``nnfs`` package's random stream: ``nnfs.init()`` then the book's calls, in order.

    ``nnfs.init()`` seeds NumPy's global RandomState with 0 and makes ``randn`` return float32; everything
    else in a book script draws from that one stream. This class keeps the stream in a private
    ``RandomState(seed)`` (no global state), so ``NNFSRandom(0)`` followed by ``spiral(100, 3)`` then
    ``dense_params(2, 64)`` draws exactly what the book's chapter-11 script draws. Results are NumPy arrays.
    """

    def __init__(self, seed: int = 0):
        self._rs = np.random.RandomState(seed)

    def randn(self, *shape: int) -> np.ndarray:
        """``np.random.randn(*shape)`` cast to float32, as after ``nnfs.init()``."""
        return self._rs.randn(*shape).astype(np.float32)

    def _per_class(self, samples: int, classes: int, where: str, points: Any) -> tuple[np.ndarray, np.ndarray]:
        """The nnfs generators' shared loop: class by class, ``points(c)`` gives that class's rows."""
        samples, classes = _check_counts(samples, classes, where)
        X = np.zeros((samples * classes, 2), dtype=np.float32)  # nnfs.init() makes np.zeros float32
        y = np.zeros(samples * classes, dtype=np.uint8)
        for c in range(classes):
            X[samples * c : samples * (c + 1)] = points(c, samples)
            y[samples * c : samples * (c + 1)] = c
        return X, y

    def spiral(self, samples: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``nnfs.datasets.spiral_data(samples, classes)``: X float32 (samples·classes, 2), y uint8."""

        def arm(c, n):
            r = np.linspace(0.0, 1, n)
            t = np.linspace(c * 4, (c + 1) * 4, n) + self.randn(n) * np.float32(0.2)
            return np.c_[r * np.sin(t * 2.5), r * np.cos(t * 2.5)]

        return self._per_class(samples, classes, "spiral", arm)

    def vertical(self, samples: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``nnfs.datasets.vertical_data(samples, classes)``."""

        def cluster(c, n):
            x0 = self.randn(n) * np.float32(0.1) + c / 3  # x drawn before y, as nnfs does
            return np.c_[x0, self.randn(n) * np.float32(0.1) + 0.5]

        return self._per_class(samples, classes, "vertical", cluster)

    def dense_params(self, n_in: int, n_out: int, scale: float = 0.01) -> dict[str, np.ndarray]:
        """The book's ``Layer_Dense(n_in, n_out)``: ``W = scale·randn(n_in, n_out)`` (float32), ``b = 0``.

        The bias is returned with shape (n_out,) (funcgrad's layout) rather than the book's (1, n_out)."""
        W = np.float32(scale) * self.randn(n_in, n_out)
        return {"W": W, "b": np.zeros(n_out, dtype=np.float32)}

    def init(self, model: Any, input_shape: int | tuple[int, ...]) -> dict:
        """Params for a funcgrad model drawn the book's way: each dense layer, in order, draws
        ``scale·randn(n_in, n_out)`` weights (scale from its ``initializers.book(scale)``) and zero biases."""
        return self._init_layer(model, as_shape(input_shape, "NNFSRandom.init"))[0]

    def _init_layer(self, layer: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        if layer.layers:
            params = {}
            for name, child in layer.layers:
                p, shape = self._init_layer(child, shape)
                if child.has_params:
                    params[name] = p
            return params, shape
        if layer.kind == "dense":
            scale = dict(layer.config).get("book_scale")
            if scale is None:
                raise ValueError(
                    "NNFSRandom.init: every dense layer must use the book's initializer "
                    "(initializers.book(scale), the default) to be drawn the book's way"
                )
            units = dict(layer.config)["units"]
            p = self.dense_params(shape[0], units, scale)
            return {k: jnp.asarray(v) for k, v in p.items()}, (units,)
        if layer.has_params:
            raise ValueError(f"NNFSRandom.init: no book initialisation for a {layer.kind} layer")
        return {}, layer.shape_fn(shape)
