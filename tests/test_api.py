"""Pins the public surface: adding or removing a public name is a deliberate change to this list."""

import funcgrad as fg

EXPECTED = {
    "fg": [
        "Objective", "checkpoint", "config", "data", "experiment", "initializers", "losses", "metrics", "nn", "optim",
        "parallel",
        "rules", "testing", "train", "verify",
    ],
    "optim": ["HYPERPARAMETERS", "OPTIMIZERS", "adagrad", "adam", "inverse_time_decay", "rmsprop",
              "scale_by_book_adagrad", "sgd"],
    "train": ["MAX_FUSE", "Metrics", "TrainState", "batch_indices", "chunk_size", "chunks", "fit", "init", "make_eval",
              "make_step", "make_steps"],
    "config": [
        "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "OptimizerConfig",
        "ParallelConfig",
        "MemoryEstimate", "Setup", "TrainConfig", "apply_overrides", "build", "from_dict", "load", "loads",
        "locate", "memory_estimate", "packaged", "to_dict",
    ],
    "checkpoint": ["CheckpointError", "FORMAT", "from_bytes", "load_flat", "metadata", "orbax_manager", "size_bound",
                   "to_bytes"],
    "parallel": ["ParallelError", "any_process", "cluster_environment", "data_mesh", "describe_mesh", "gather",
                 "initialize", "is_writer", "place",
                 "setup_for"],
    "nn": [
        "ACTIVATIONS", "Layer", "Params", "activation", "dense", "dropout", "elementwise", "leaky_relu", "linear",
        "log_softmax", "mlp", "param_count", "relu", "serial", "sigmoid", "softmax", "tanh",
    ],
    "losses": [
        "LOSSES", "binary_crossentropy", "categorical_crossentropy", "categorical_crossentropy_with_logits", "checked",
        "l1_penalty", "l2_penalty", "leaf_names", "mae", "mse", "select",
    ],
    "metrics": ["accuracy", "binary_accuracy", "regression_accuracy"],
    "experiment": ["Setup", "build"],
    "data": ["NNFSRandom", "as_key", "fashion_mnist", "sine", "spiral", "vertical"],
    "initializers": [
        "INITIALIZERS", "Initializer", "Normal", "book", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
        "normal", "zeros",
    ],
    "rules": [
        "CATALOG", "Rule", "add", "binary_crossentropy", "categorical_crossentropy", "chain", "dense", "dropout",
        "l1", "l2", "leaky_relu", "linear", "log_softmax", "mae", "maximum", "mse", "multiply", "neuron",
        "one_hot_like", "polynomial", "relu", "sigmoid", "softmax", "softmax_crossentropy", "softmax_jacobian",
        "tanh",
    ],
    "verify": [
        "AuditReport", "AuditRow", "ChainReport", "GradReport", "PASSING", "Row", "VERDICTS", "audit", "check_chain",
        "check_grad", "check_jacobian", "check_vjp",
    ],
    "testing": ["assert_chain_ok", "assert_grads_match", "assert_rules_ok", "assert_vjp_matches"],
}


def test_public_names_are_pinned():
    modules = {"fg": fg, **{name: getattr(fg, name) for name in EXPECTED if name != "fg"}}
    for name, module in modules.items():
        assert sorted(module.__all__) == sorted(EXPECTED[name]), name
        for attr in module.__all__:
            assert hasattr(module, attr), f"{name}.{attr}"


def test_importing_funcgrad_leaves_x64_off():
    import jax.numpy as jnp

    assert jnp.zeros(1).dtype == jnp.float32
