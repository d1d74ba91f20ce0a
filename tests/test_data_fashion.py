"""fashion_mnist: tiny fake data sets written here in each layout (Zalando's IDX files, plain and gzipped; the book's
PNG folders), read back and compared with an independent transcription of the book's loading and preprocessing."""

import gzip
import os
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg

N = {"train": 12, "test": 5}
PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
URLS = ("https://github.com/zalandoresearch/fashion-mnist", "https://nnfs.io/datasets/fashion_mnist_images.zip")


def make_split(split):
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    images = rng.integers(0, 256, (N[split], 28, 28), dtype=np.uint8)
    images[0, 0, :3] = (0, 255, 128)  # both ends of the range, and the book's centre
    labels = rng.integers(0, 10, N[split]).astype(np.uint8)
    return images, labels


DATA = {split: make_split(split) for split in N}


def idx_bytes(array, magic):
    """The IDX format, written with struct: big-endian magic, big-endian uint32 dimensions, then the bytes."""
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write(path, data, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_idx(folder, gz=False, splits=("train", "test")):
    for split in splits:
        images, labels = DATA[split]
        write(folder / f"{PREFIX[split]}-images-idx3-ubyte", idx_bytes(images, IMAGES_MAGIC), gz)
        write(folder / f"{PREFIX[split]}-labels-idx1-ubyte", idx_bytes(labels, LABELS_MAGIC), gz)
    return folder


def write_pngs(folder):
    from PIL import Image

    for split in N:
        images, labels = DATA[split]
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / split / str(label) / f"{i:04d}.png")  # a uint8 2-D array: mode L
    return folder


def book_preprocessing(images):
    """The book's chapter-19 lines, transcribed: scale to [-1, 1] in float32, then flatten."""
    X = (images.astype(np.float32) - 127.5) / 127.5
    return X.reshape(X.shape[0], -1)


def assert_same(X, y, want_X, want_y):
    assert X.dtype == jnp.float32 and y.dtype == jnp.int32
    assert X.shape == want_X.shape and y.shape == want_y.shape
    np.testing.assert_array_equal(np.asarray(X), want_X)
    np.testing.assert_array_equal(np.asarray(y), want_y.astype(np.int32))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_idx_files_give_the_books_preprocessing(tmp_path, gz):
    write_idx(tmp_path, gz)
    for split, n in N.items():
        images, labels = DATA[split]
        X, y = fg.data.fashion_mnist(tmp_path, split)
        assert X.shape == (n, 784)
        assert_same(X, y, book_preprocessing(images), labels)
    X, y = fg.data.fashion_mnist(str(tmp_path))  # a str path, and the default split: train
    assert_same(X, y, book_preprocessing(DATA["train"][0]), DATA["train"][1])
    assert float(X.min()) == -1.0 and float(X.max()) == 1.0  # pixels 0 and 255 are in the data


def test_png_folders_equal_the_idx_files_in_label_then_name_order(tmp_path):
    write_pngs(tmp_path / "fashion_mnist_images")
    write_idx(tmp_path / "idx")
    for split in N:
        images, labels = DATA[split]
        order = np.argsort(labels, kind="stable")  # label folders 0..9, each in file-name (= index) order
        X_png, y_png = fg.data.fashion_mnist(tmp_path / "fashion_mnist_images", split)
        assert_same(X_png, y_png, book_preprocessing(images[order]), labels[order])
        X_idx, y_idx = fg.data.fashion_mnist(tmp_path / "idx", split)
        np.testing.assert_array_equal(np.asarray(X_png), np.asarray(X_idx)[order])
        np.testing.assert_array_equal(np.asarray(y_png), np.asarray(y_idx)[order])
    # The folder above the book's fashion_mnist_images/ finds it too.
    X, y = fg.data.fashion_mnist(tmp_path, "test")
    order = np.argsort(DATA["test"][1], kind="stable")
    assert_same(X, y, book_preprocessing(DATA["test"][0][order]), DATA["test"][1][order])


def test_scales_shapes_and_dtype(tmp_path, x64):
    write_idx(tmp_path)
    images, labels = DATA["test"]
    X, _ = fg.data.fashion_mnist(tmp_path, "test", scale="unit")
    np.testing.assert_array_equal(np.asarray(X), images.reshape(N["test"], -1).astype(np.float32) / np.float32(255))
    X, _ = fg.data.fashion_mnist(tmp_path, "test", scale=None, flatten=False)
    assert X.shape == (N["test"], 28, 28) and X.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(X), images.astype(np.float32))
    X, _ = fg.data.fashion_mnist(tmp_path, "test", dtype=jnp.float64)
    assert X.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(X), (images.reshape(N["test"], -1).astype(np.float64) - 127.5) / 127.5)


def test_torchvision_and_zalando_repository_layouts(tmp_path):
    write_idx(tmp_path / "torch" / "FashionMNIST" / "raw", gz=True)
    write_idx(tmp_path / "clone" / "data" / "fashion", gz=True)
    for root in (tmp_path / "torch", tmp_path / "clone"):
        X, y = fg.data.fashion_mnist(root, "test")
        assert_same(X, y, book_preprocessing(DATA["test"][0]), DATA["test"][1])


def test_plain_file_is_read_before_its_gz(tmp_path):
    write_idx(tmp_path)
    images, labels = DATA["train"]
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(255 - images, IMAGES_MAGIC), gz=True)  # different data
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(9 - labels, LABELS_MAGIC), gz=True)
    X, y = fg.data.fashion_mnist(tmp_path)
    assert_same(X, y, book_preprocessing(images), labels)


# --- missing data -----------------------------------------------------------------------------------------------


def assert_says_where_to_get_it(message):
    for url in URLS:
        assert url in message
    assert "download" in message and "never" in message


def test_missing_folder_or_files_say_where_to_download_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        fg.data.fashion_mnist(tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "does not exist" in str(e.value)
    assert_says_where_to_get_it(str(e.value))
    with pytest.raises(FileNotFoundError) as e:  # an empty folder: says what was looked for, and where
        fg.data.fashion_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value) and "train/<label>/*.png" in str(e.value)
    assert str(tmp_path / "fashion_mnist_images") in str(e.value)
    assert_says_where_to_get_it(str(e.value))
    archive = write(tmp_path / "fashion_mnist_images.zip", b"PK")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        fg.data.fashion_mnist(archive)


def test_a_missing_split_or_half_of_a_pair_is_named(tmp_path):
    write_idx(tmp_path, splits=("train",))
    fg.data.fashion_mnist(tmp_path)  # the train split is there
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as e:
        fg.data.fashion_mnist(tmp_path, "test")
    assert_says_where_to_get_it(str(e.value))
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="but not train-labels-idx1-ubyte") as e:
        fg.data.fashion_mnist(tmp_path)
    assert_says_where_to_get_it(str(e.value))


# --- corrupt files: a ValueError (funcgrad._io.FileError) that names the file -----------------------------------


def corrupt(tmp_path, name, data, gz=False):
    """The train split written whole, then one of its files replaced by `data`; the error raised reading it."""
    write_idx(tmp_path, gz=gz, splits=("train",))
    path = write(tmp_path / name, data, gz=gz)
    with pytest.raises(ValueError) as e:
        fg.data.fashion_mnist(tmp_path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_wrong_magic_number(tmp_path):
    images, labels = DATA["train"]
    message = corrupt(tmp_path, "train-images-idx3-ubyte", idx_bytes(labels, LABELS_MAGIC))  # a labels file
    assert "magic number 0x00000801" in message and "0x00000803" in message and "swapped" in message
    message = corrupt(tmp_path, "train-labels-idx1-ubyte", struct.pack(">II", 0x00000D01, 12) + bytes(48))  # floats
    assert "magic number 0x00000D01" in message


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_truncated_and_overlong_files(tmp_path, gz):
    images, labels = DATA["train"]
    whole = idx_bytes(images, IMAGES_MAGIC)
    message = corrupt(tmp_path, "train-images-idx3-ubyte", whole[:-10], gz)
    assert "truncated" in message and f"{12 * 784 - 10} bytes" in message and "12×28×28" in message
    message = corrupt(tmp_path, "train-images-idx3-ubyte", whole + b"\0", gz)
    assert "longer than its header" in message
    message = corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(labels, LABELS_MAGIC)[:6], gz)
    assert "too short for an IDX labels header" in message


def test_broken_gzip_stream_and_a_bomb_header(tmp_path):
    images, _ = DATA["train"]
    packed = gzip.compress(idx_bytes(images, IMAGES_MAGIC))
    write_idx(tmp_path, gz=True, splits=("train",))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(packed[: len(packed) // 2])  # the compressed stream cut short
    with pytest.raises(ValueError, match="not a readable gzip file") as e:
        fg.data.fashion_mnist(tmp_path)
    assert str(path) in str(e.value)
    # A header declaring 2**31 images: refused before anything is decompressed past it.
    message = corrupt(tmp_path, "train-images-idx3-ubyte", struct.pack(">IIII", IMAGES_MAGIC, 2**31, 28, 28), gz=True)
    assert f"declares {2**31 * 784} bytes" in message


def test_counts_labels_and_image_size_are_checked(tmp_path):
    images, labels = DATA["train"]
    message = corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(labels[:-1], LABELS_MAGIC))
    assert "holds 12 images" in message and "holds 11 labels" in message
    bad = labels.copy()
    bad[3] = 10
    message = corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(bad, LABELS_MAGIC))
    assert "label 10 at index 3" in message
    message = corrupt(tmp_path, "train-images-idx3-ubyte", idx_bytes(images[:, :27], IMAGES_MAGIC))
    assert "27×28 pixels" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path):
    write_idx(tmp_path, splits=("train",))
    path = tmp_path / "train-images-idx3-ubyte"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match="FIFO") as e:
        fg.data.fashion_mnist(tmp_path)
    assert str(path) in str(e.value)


def test_png_that_is_not_28x28_grayscale_or_not_a_png_is_named(tmp_path):
    from PIL import Image

    folder = write_pngs(tmp_path)
    first = sorted((folder / "train" / str(DATA["train"][1].min())).iterdir())[0]
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(first)  # RGB
    with pytest.raises(ValueError, match="mode RGB") as e:
        fg.data.fashion_mnist(folder)
    assert str(first) in str(e.value)
    Image.fromarray(np.zeros((28, 27), np.uint8)).save(first)
    with pytest.raises(ValueError, match="a 27×28 image of mode L"):
        fg.data.fashion_mnist(folder)
    first.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="not a readable PNG image") as e:
        fg.data.fashion_mnist(folder)
    assert str(first) in str(e.value)
    first.unlink()
    (folder / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match="one folder per label") as e:
        fg.data.fashion_mnist(folder)
    assert str(folder / "train" / "cat") in str(e.value)


def test_png_folders_without_pillow_say_so(tmp_path, monkeypatch):
    folder = write_pngs(tmp_path)
    fg.data.fashion_mnist(folder, "test")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails, as without Pillow
    with pytest.raises(ImportError, match="needs Pillow"):
        fg.data.fashion_mnist(folder, "test")


# --- arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "validation"}, ValueError, "split must be 'train' or 'test'; got 'validation'"),
        ({"split": None}, ValueError, "split must be 'train' or 'test'; got None"),
        ({"scale": "minmax"}, ValueError, r"scale must be 'book' .* got 'minmax'"),
        ({"flatten": 1}, TypeError, "flatten must be True or False; got int 1"),
        ({"dtype": jnp.int32}, TypeError, "dtype must be a floating dtype .* got"),
        ({"dtype": None}, TypeError, "dtype must be a floating dtype .* got None"),
        ({"path": 123}, TypeError, "path must be a folder, as a str or a pathlib.Path; got int 123"),
        ({"path": ""}, ValueError, "path must name a folder"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    write_idx(tmp_path)
    kwargs = {"path": tmp_path, **kwargs}
    with pytest.raises(error, match=match):
        fg.data.fashion_mnist(**kwargs)


# ---- the chapter-19 config, end to end on a tiny copy ----


@pytest.mark.slow
def test_the_fashion_mnist_config_trains_on_local_files(tmp_path):
    import json

    from conftest import run_python

    cfg = fg.config.load(fg.config.locate("fashion_mnist"))
    assert (cfg.model.sizes, cfg.optimizer.kind, cfg.train.batch_size) == ((128, 128, 10), "adam", 128)
    write_idx(tmp_path / "data", gz=True)
    out = tmp_path / "run"
    proc = run_python(["-m", "funcgrad", "train", "--config", "fashion_mnist", "--out", str(out), "--json",
                       "--set", f"data.path={json.dumps(str(tmp_path / 'data'))}", "--set", "train.batch_size=4",
                       "--set", "train.epochs=2", "--set", "train.fuse=3", "--set", "train.eval_every=3"],
                      env={"FUNCGRAD_COMPILATION_CACHE": "0"})
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 2 * (N["train"] // 4)
    assert "data   fashion_mnist (12, 784)" in proc.stderr and "validation (5, 784)" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "validation"] == [3, 6]


def test_the_fashion_mnist_config_without_its_files_says_where_to_get_them(tmp_path):
    from conftest import run_python

    proc = run_python(["-m", "funcgrad", "train", "--config", "fashion_mnist", "--out", str(tmp_path / "run"),
                       "--set", f"data.path='{tmp_path / 'nothing'}'"], check=False,
                      env={"FUNCGRAD_COMPILATION_CACHE": "0"})
    assert proc.returncode == 2, proc.stderr
    assert "data.path" in proc.stderr and URLS[0] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting,match", [("data.classes=3", "Fashion-MNIST has 10 classes"),
                                           ("data.exact=true", "read from files"),
                                           ("data.path=''", "expected a folder path")])
def test_fashion_mnist_config_mistakes(setting, match):
    raw = fg.config.apply_overrides(fg.config.to_dict(fg.config.load(fg.config.locate("fashion_mnist"))), [setting])
    with pytest.raises(fg.config.ConfigError, match=match):
        fg.config.from_dict(raw)
