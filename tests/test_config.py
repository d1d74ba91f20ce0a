import numpy as np
import pytest
from conftest import ROOT

import funcgrad as fg
from funcgrad import config

SHIPPED = ["spiral", "spiral_l2", "spiral_dropout", "binary", "sine"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_round_trip(name):
    cfg = config.load(ROOT / "configs" / f"{name}.toml")
    assert cfg.name == name and cfg.data.exact
    again = config.from_dict(config.to_dict(cfg))
    assert again == cfg


def test_book_settings_of_chapter_11():
    cfg = config.load(ROOT / "configs" / "spiral.toml")
    assert (cfg.data.kind, cfg.data.samples, cfg.data.classes) == ("spiral", 100, 3)
    assert cfg.model.sizes == (64, 3) and cfg.model.activation == "relu" and cfg.model.output == "softmax"
    assert (cfg.optimizer.kind, cfg.optimizer.learning_rate, cfg.optimizer.decay) == ("adam", 0.05, 5e-7)
    assert cfg.train.epochs == 10001 and cfg.train.batch_size is None


def test_build_draws_the_books_stream():
    cfg = config.load(ROOT / "configs" / "spiral.toml")
    setup = config.build(cfg)
    stream = fg.data.NNFSRandom(0)
    X, y = stream.spiral(100, 3)
    W1 = stream.dense_params(2, 64)["W"]
    np.testing.assert_array_equal(np.asarray(setup.train_data[0]), X)
    np.testing.assert_array_equal(np.asarray(setup.params["dense1"]["W"]), W1)
    stream.dense_params(64, 3)
    np.testing.assert_array_equal(np.asarray(setup.validation_data[0]), stream.spiral(100, 3)[0])
    assert setup.steps == 10001


def test_keyed_data_and_minibatch_steps():
    cfg = config.loads('name = "x"\n[data]\nexact = false\n[train]\nepochs = 3\nbatch_size = 64\n')
    setup = config.build(cfg)
    assert setup.steps == 3 * (300 // 64) and setup.batch_size == 64
    assert not np.array_equal(np.asarray(setup.train_data[0]), np.asarray(setup.validation_data[0]))
    assert config.loads("[train]\nbatch_size = 0").train.batch_size is None  # 0 means full batch


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        (
            "[optimizer]\nlearning_rat = 0.1",
            (),
            r"optimizer.learning_rat: unknown key; allowed keys in \[optimizer\]: \['beta1'",
        ),
        ("[optimiser]\nkind = 'adam'", (), r"optimiser: unknown key; allowed keys: \[.*'optimizer'"),
        ("[train]\nepochs = -3", (), r"train.epochs: expected an integer >= 1, got -3"),
        ("[train]\nepochs = 2.5", (), r"train.epochs: expected an integer >= 1, got 2.5"),
        (
            "[optimizer]\nkind = 'adamw'",
            (),
            r"optimizer.kind: expected one of \['sgd', 'adagrad', 'rmsprop', 'adam'\], got 'adamw'",
        ),
        ("[optimizer]\nkind = 'adam'\nmomentum = 0.9", (), r"optimizer.momentum: not a setting of 'adam'"),
        ("[model]\noutput = 'sigmoid'", (), r"model.output: loss 'categorical_crossentropy' takes probabilities"),
        ("[model]\nsizes = [64, 4]", (), r"model.sizes: the last layer must have data.classes = 3 units"),
        ("[model]\nsizes = []", (), r"model.sizes: expected a non-empty list of positive integers"),
        ("[loss]\nl2 = { 'dense1/W' = -1 }", (), r"loss.l2.dense1/W: expected a finite number >= 0, got -1"),
        ("[loss]\nl2 = { 'dense1/W' = inf }", (), r"loss.l2.dense1/W: expected a finite number >= 0, got inf"),
        ("[data]\nexact = 'yes'", (), r"data.exact: expected true or false, got 'yes'"),
        ("[train]\nbatch_size = 1000", (), r"train.batch_size: 1000 is more than the 300 training samples"),
        ("name = 'a/b'", (), r"name: expected a non-empty name without slashes"),
        ("[train\nepochs = 1", (), r"not valid TOML"),
        ("", ("optimizer.learning_rate",), r"expected key=value"),
        ("", ("optimizer.learning_rate=-1",), r"optimizer.learning_rate: expected a finite number > 0.0, got -1"),
        ("", ("model.sizes.x=1",), r"model.sizes: expected a non-empty list of positive integers"),
        ("", ("optimizer.decay=inf",), r"optimizer.decay: expected a finite number >= 0.0, got inf"),
        ("[data]\nclasses = 1\n[model]\nsizes = [64, 1]", (), r"data.classes: expected an integer >= 2, got 1"),
        ("seed = 4294967296", (), r"seed: expected an integer >= 0 and < 4294967296"),
        ("[train]\nepochs = 3000000000", (), r"train.epochs: .* steps; at most 2147483647"),
        ("[model]\nsizes = [3]", ("model.sizes.x=1",), r"'sizes' is not a table"),
        ("", ("model.init_scale=1e308",), r"model.init_scale: expected a finite number > 0.0 and < 1000.0, got 1e\+308"),
        ("[data]\nkind = 'spiral'\npath = 'x'", (), r"data.path: not a setting of data.kind 'spiral', whose data is "
         r"drawn, not read from files; only data.kind 'fashion_mnist' reads a path"),
        ("", ("data.kind=sine", "data.path=/data"), r"data.path: not a setting of data.kind 'sine'"),
    ],
)
def test_errors_name_the_key_the_value_and_what_is_allowed(text, overrides, match):
    with pytest.raises(config.ConfigError, match=match):
        config.loads(text, overrides=overrides)


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file():
    with pytest.raises(config.ConfigError, match=r"^--set train.epochs=abc: train.epochs: expected an integer >= 1"):
        config.loads("[train]\nepochs = 3", overrides=["train.epochs=abc"], source="spiral.toml")
    with pytest.raises(config.ConfigError, match=r"^spiral.toml: train.epochs: expected an integer >= 1, got -3"):
        config.loads("[train]\nepochs = -3", overrides=["optimizer.learning_rate=0.5"], source="spiral.toml")
    # An unknown section is the --set's that names it, not the file's (h83); one the file has is the file's.
    with pytest.raises(config.ConfigError, match=r"^--set nonexistent.key=1: nonexistent: unknown key"):
        config.loads("[train]\nepochs = 3", overrides=["nonexistent.key=1"], source="spiral.toml")
    with pytest.raises(config.ConfigError, match=r"^spiral.toml: bogus: unknown key"):
        config.loads("[bogus]\nx = 1", overrides=["bogus.y=1"], source="spiral.toml")


def test_overrides_parse_toml_values():
    cfg = config.loads("", overrides=["optimizer.learning_rate=0.02", "model.sizes=[32, 3]", "model.activation=tanh",
                                      "data.exact=true", "name=demo"])
    assert cfg.optimizer.learning_rate == 0.02 and cfg.model.sizes == (32, 3)
    assert cfg.model.activation == "tanh" and cfg.data.exact is True and cfg.name == "demo"


def test_penalty_patterns_are_checked_against_the_model():
    cfg = config.loads("[loss]\nl2 = { 'dens1/W' = 5e-4 }")
    with pytest.raises(config.ConfigError, match=r"loss.l2.dens1/W: where: pattern 'dens1/W' matches no parameter"):
        config.build(cfg)


def test_missing_file():
    with pytest.raises(config.ConfigError, match="cannot read config .*nope.toml"):
        config.load("nope.toml")


def test_an_override_value_may_contain_equals_signs():
    cfg = config.loads("", overrides=["name=a=b=c", "data.kind=fashion_mnist", "data.classes=10", "model.sizes=[8, 10]",
                                      "data.path = /tmp/x=y"])
    assert cfg.name == "a=b=c" and str(cfg.data.path) == "/tmp/x=y"


def test_data_path_is_kept_only_for_a_kind_that_reads_it():
    fashion = config.load(config.locate("fashion_mnist"))
    assert config.to_dict(fashion)["data"]["path"] == "fashion_mnist_images"
    assert config.from_dict(config.to_dict(fashion)) == fashion
    spiral = config.load(ROOT / "configs" / "spiral.toml")
    assert "path" not in config.to_dict(spiral)["data"]  # so the resolved config of a spiral run loads again
    assert config.from_dict(config.to_dict(spiral)) == spiral


def test_a_config_file_may_start_with_a_byte_order_mark(tmp_path):
    text = (ROOT / "configs" / "spiral.toml").read_text()
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Notepad writes UTF-8
    assert config.load(path) == config.load(ROOT / "configs" / "spiral.toml")  # (it names itself spiral)
    assert config.loads("\ufeff" + text) == config.loads(text)


def test_memory_estimate_counts_each_part_as_documented():
    """The estimate's model, counted by hand for spiral 100×3 → 64 → 3 with Adam, in float32 bytes."""
    cfg = config.loads("", overrides=["train.verify=true"])
    est = config.memory_estimate(cfg)
    params = 2 * 64 + 64 + 64 * 3 + 3
    n = 300  # 100 samples × 3 classes, and as many validation samples
    units = 64 + 3
    assert est.parameters == params
    # params, gradient, update, new params and 2 Adam slots, old and new; one host copy and its file bytes
    assert est.state == params * 4 * ((4 + 2 * 2) + 2 * (1 + 2))
    # full batch: 4 values per sample and unit (forward, pre-activation and their gradients)
    assert est.activations == n * units * 4 * 4
    assert est.data == (n + n) * (2 + 1) * 4 * 2  # X and y, training and validation, host and device
    # the float64 check: 6 parameter-sized float64 arrays and 4 activations per sample and unit, doubled
    assert est.check == 2 * (params * 8 * 6 + n * units * 8 * 4)
    assert est.total == est.state + est.activations + est.data + est.check

    dropout = config.memory_estimate(config.loads("", overrides=["model.dropout=0.1", "train.verify=true"]))
    assert dropout.activations == n * units * 4 * 5  # and a dropout mask
    assert config.memory_estimate(config.loads("", overrides=["train.verify=false"])).check == 0
    sgd = config.memory_estimate(config.loads("", overrides=["optimizer.kind=sgd", "optimizer.learning_rate=1.0"]))
    assert sgd.state == params * 4 * ((4 + 2) + 2 * 2)


def test_memory_estimate_over_devices():
    est = config.memory_estimate(config.loads(""))
    assert est.on(1, shared=True) == est.on(1, shared=False) == est.total
    # CPU devices of one host share memory: each holds the state, the batch and data are split among them
    assert est.on(2, shared=True) == 2 * est.state + est.activations + est.data + est.check
    # accelerators: the figure per device, with its share (rounded up) of activations and data
    assert est.on(2, shared=False) == est.state + -(-est.activations // 2) + -(-est.data // 2) + est.check
    assert est.on(3, shared=False) < est.on(2, shared=False) < est.total


def test_an_integer_too_long_for_python_is_a_config_error():
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.loads("[train]\nepochs = " + "9" * 5000)
