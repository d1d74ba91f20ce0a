"""Every bad input names what it is: the argument (or hyperparameter, or pytree path), what was expected, and
what was given. Mutation testing found these messages unchecked: a message naming the wrong argument, or
none, passed the suite. One table per module, each row a call that must fail and the words its message must
contain (the argument's own name first)."""

import jax
import numpy as np
import pytest

import funcgrad as fg
from funcgrad import checkpoint, data, losses, metrics, optim

F = np.full((4, 1), 0.5, np.float32)  # a valid (N, 1) float batch
F2 = np.full((4, 2), 0.5, np.float32)
LOGITS = np.zeros((4, 3), np.float32)
LABELS = np.array([0, 1, 2, 0])


def raises_naming(call, error, *words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in the message {message!r}"
    return message


# (function, its two array arguments' names, a valid first argument, a valid second argument)
PAIRED = [
    (losses.binary_crossentropy, "probs", "targets", F, F),
    (losses.mse, "pred", "target", F, F),
    (losses.mae, "pred", "target", F, F),
    (metrics.binary_accuracy, "probs", "targets", F, F),
    (metrics.regression_accuracy, "pred", "target", F, F),
]


@pytest.mark.parametrize(("fn", "a", "b", "x", "y"), PAIRED, ids=lambda v: getattr(v, "__name__", None))
def test_losses_and_metrics_name_the_argument_that_is_not_an_array(fn, a, b, x, y):
    assert raises_naming(lambda: fn("oops", y), TypeError, "got str").startswith(f"{a} must be an array")
    assert raises_naming(lambda: fn(x, "oops"), TypeError, "got str").startswith(f"{b} must be an array")


@pytest.mark.parametrize(("fn", "a", "b", "x", "y"), PAIRED, ids=lambda v: getattr(v, "__name__", None))
def test_losses_and_metrics_name_both_arguments_of_a_shape_mismatch(fn, a, b, x, y):
    raises_naming(lambda: fn(x, F2), ValueError, f"{a} and {b} must have the same shape", f"{a} float32[4,1]",
                  f"{b} float32[4,2]")


@pytest.mark.parametrize(("fn", "scores"), [(losses.categorical_crossentropy, "probs"),
                                           (losses.categorical_crossentropy_with_logits, "logits"),
                                           (metrics.accuracy, "outputs")], ids=lambda v: getattr(v, "__name__", v))
def test_class_losses_name_scores_and_labels(fn, scores):
    assert raises_naming(lambda: fn("oops", LABELS), TypeError).startswith(scores)
    assert raises_naming(lambda: fn(LOGITS, "oops"), TypeError).startswith("labels")


# Every hyperparameter of every optimizer, out of its range: (optimizer, keyword, bad value, the range's words).
HYPER = [
    (optim.sgd, "learning_rate", -1.0, "> 0"), (optim.sgd, "decay", -1.0, ">= 0"),
    (optim.sgd, "momentum", 1.0, "< 1"),
    (optim.adagrad, "learning_rate", 0.0, "> 0"), (optim.adagrad, "decay", -0.5, ">= 0"),
    (optim.adagrad, "eps", 0.0, "> 0"),
    (optim.rmsprop, "learning_rate", float("nan"), "> 0"), (optim.rmsprop, "decay", float("inf"), ">= 0"),
    (optim.rmsprop, "rho", 1.5, "< 1"), (optim.rmsprop, "rho", -0.1, ">= 0"), (optim.rmsprop, "eps", 0.0, "> 0"),
    (optim.adam, "learning_rate", -0.1, "> 0"), (optim.adam, "decay", -1e-7, ">= 0"),
    (optim.adam, "beta1", 1.0, "< 1"), (optim.adam, "beta2", 1.0, "< 1"), (optim.adam, "beta2", -0.5, ">= 0"),
    (optim.adam, "eps", -1e-7, "> 0"),
]


@pytest.mark.parametrize(("opt", "name", "value", "expected"), HYPER, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimizers_name_the_hyperparameter_and_its_range(opt, name, value, expected):
    message = raises_naming(lambda: opt(**{name: value}), ValueError, expected, f"got {value!r}")
    assert message.startswith(f"{name} must be"), message


def test_optimizers_name_a_hyperparameter_of_the_wrong_type():
    raises_naming(lambda: optim.rmsprop(0.1, rho="a"), ValueError, "rho must be", "got 'a'")
    raises_naming(lambda: optim.adam(0.1, eps=None), ValueError, "eps must be", "got None")


@pytest.mark.parametrize("generator", ["spiral", "vertical"])
def test_book_data_generators_name_themselves_and_the_count(generator):
    stream = data.NNFSRandom(0)
    raises_naming(lambda: getattr(stream, generator)(0, 3), ValueError, f"{generator}: samples must be an int >= 1",
                  "got 0")
    raises_naming(lambda: getattr(stream, generator)(5, 0), ValueError, f"{generator}: classes must be an int >= 1")
    raises_naming(lambda: getattr(data, generator)(5, 2.0), ValueError, f"{generator}: classes must be an int")


@pytest.mark.parametrize("generator", ["spiral", "vertical"])
def test_exact_data_names_the_generator_and_wants_an_int_seed(generator):
    raises_naming(lambda: getattr(data, generator)(5, 3, key=jax.random.key(0), exact=True), TypeError,
                  f"{generator}(exact=True): key must be an int seed for NumPy's RandomState", "got ")


def test_book_initialisation_names_the_layer_it_cannot_initialise():
    model = fg.nn.serial(fg.nn.dense(4, W_init=fg.initializers.zeros), fg.nn.relu())
    raises_naming(lambda: data.NNFSRandom(0).init(model, 2), ValueError,
                  "NNFSRandom.init: every dense layer must use the book's initializer")


@pytest.mark.parametrize(("leaf", "what"), [(np.datetime64("2020-01-01"), "a NumPy scalar of dtype datetime64[D]"),
                                            (np.array(["x"]), "a NumPy array of dtype <U1"),
                                            ("text", "a str")])
def test_checkpoint_names_the_leaf_that_cannot_be_stored_and_what_it_is(leaf, what):
    message = raises_naming(lambda: checkpoint.to_bytes({"params": {"w": leaf}}), checkpoint.CheckpointError,
                            "a checkpoint holds arrays of numbers")
    assert message.startswith(f"leaf ['params']['w'] is {what}; "), message


def test_a_checkpoint_that_does_not_match_names_three_leaves_and_counts_the_rest():
    saved = checkpoint.to_bytes({k: np.zeros(2, np.float32) for k in "abcde"})
    message = raises_naming(lambda: checkpoint.from_bytes(saved, {k: np.zeros(3, np.float32) for k in "abcde"}),
                            checkpoint.CheckpointError, "checkpoint does not match the template: ",
                            "['a']: stored float32[2], expected float32[3]; ['b']", "; ['c']")
    assert message.endswith("expected float32[3]; and 2 more") and "['d']" not in message, message


def test_accuracy_takes_two_or_more_classes_and_points_a_single_output_to_binary_accuracy():
    two = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]], np.float32)
    assert float(metrics.accuracy(two, np.array([1, 0, 0]))) == pytest.approx(2 / 3)  # argmax: 1, 0, 1
    message = raises_naming(lambda: metrics.accuracy(F, np.zeros(4, int)), ValueError,
                            "accuracy needs at least 2 classes", "outputs float32[4,1]")
    assert message.endswith(". For a single sigmoid output use binary_accuracy."), message


def test_binary_accuracy_wants_floating_probabilities():
    raises_naming(lambda: metrics.binary_accuracy(np.ones((4, 1), np.int32), F), TypeError,
                  "probs must have a floating dtype", "got int32[4,1]")


def test_training_names_the_data_shapes_and_the_key_it_was_given():
    tx = optim.sgd(0.1)
    with pytest.raises(TypeError, match=r"init: key must be a PRNG key from jax.random.key\(seed\); got int"):
        fg.train.init({"w": np.zeros(2, np.float32)}, tx, 0)
    state = fg.train.init({"w": np.zeros(2, np.float32)}, tx, jax.random.key(0))
    step = fg.train.make_step(lambda p, x, y: ((x @ p["w"] - y) ** 2).mean(), tx)
    raises_naming(lambda: step(state, (np.zeros((5, 2), np.float32), np.zeros(4, np.float32))), ValueError,
                  "data arrays must share their leading (sample) axis", "float32[5,2]", "float32[4]")
