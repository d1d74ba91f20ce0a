"""The verifier on arrays sharded along explicit mesh axes (``jax.make_mesh``'s default axis types), where the sharding
is part of JAX's types: check_grad, check_vjp and audit on 8 simulated CPU devices, in a subprocess (the device
count is fixed when JAX starts). Each verdict is compared with the same check on the unsharded arrays, and each
planted mistake is one the test builds (a hand or a rule 25% off at one element or everywhere)."""

import json

import pytest

from tests.conftest import run_python

EIGHT = {"JAX_NUM_CPU_DEVICES": "8", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import funcgrad as fg

mesh = jax.make_mesh((2, 4), ("data", "model"))
assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types), mesh.axis_types
rs = np.random.RandomState(0)
X = rs.randn(16, 8).astype(np.float32)
W = (0.4 * rs.randn(8, 12)).astype(np.float32)

def loss(p, x):
    return jnp.mean(jnp.tanh(x @ p["W"]) ** 2)

def hand(wrong):
    def h(p, x):
        t = jnp.tanh(jnp.asarray(x) @ p["W"])
        g = np.asarray(x).T @ np.asarray(2 * t * (1 - t ** 2) / t.size)
        if wrong:
            g = g.copy(); g[3, 5] *= 1.25
        return {"W": g}
    return h

def rule(wrong):
    @jax.custom_vjp
    def softsign(z):
        return z / (1 + jnp.abs(z))
    def fwd(z):
        return softsign(z), z
    def bwd(z, g):
        return ((1.25 if wrong else 1.0) * g / (1 + jnp.abs(z)) ** 2,)
    softsign.defvjp(fwd, bwd)
    return softsign

def model(r, inside):
    def m(p, x):
        z = x @ p["W"]
        if inside:  # fn places the rule's input along the data axis itself
            z = jax.sharding.reshard(z, P("data"))
        return jnp.mean(r(z) ** 2)
    return m

def row(rep):
    bad = [r for r in rep.rows if not r.ok]
    return [rep.verdict, [str(r.worst_index) for r in bad], list(rep.notes)]

out = {}
xs = jax.device_put(X, NamedSharding(mesh, P("data")))
ps = {"W": jax.device_put(W, NamedSharding(mesh, P(None, "model")))}
with jax.set_mesh(mesh):
    out["types"] = [str(jax.typeof(ps["W"])), str(jax.typeof(xs))]
    for wrong in (False, True):
        out[f"grad_{wrong}"] = row(fg.verify.check_grad(jax.jit(loss), ps, xs, hand=hand(wrong)))
        out[f"vjp_{wrong}"] = row(fg.verify.check_vjp(
            lambda z: jnp.sin(z), lambda z, g: (1.25 if wrong else 1.0) * g * jnp.cos(z), xs))
        for inside in (False, True):
            out[f"audit_{wrong}_{inside}"] = row(fg.verify.audit(jax.jit(model(rule(wrong), inside)), ps, xs))
out["grad_True_plain"] = row(fg.verify.check_grad(loss, {"W": W}, X, hand=hand(True)))

BUMP_W = np.ones((8, 12), np.float32); BUMP_W[3, 5] = 1.25
BUMP_J = np.ones((8, 8), np.float32); BUMP_J[1, 2] = 1.25

# fn places its activation along the model axis, and a hand mirroring fn inherits that placement in its output
def placed_loss(p, x):
    return jnp.mean(jnp.tanh(jax.sharding.reshard(x @ p["W"], P(None, "model"))) ** 2)

def placed_hand(wrong):
    def h(p, x):
        t = jnp.tanh(jax.sharding.reshard(x @ p["W"], P(None, "model")))
        g = x.T @ (2 * t * (1 - t ** 2) / t.size)
        return {"W": g * BUMP_W if wrong else g}  # (.at[] on a placed array needs out_sharding)
    return h

def softmax_jac(wrong):
    def j(z):
        s = jax.nn.softmax(z)
        J = jax.sharding.reshard(jnp.diag(s) - jnp.outer(s, s), P("data"))
        return J * BUMP_J if wrong else J
    return j

def chain(wrong):
    return [("tanh", lambda x: jax.sharding.reshard(jnp.tanh(x), P("data")),
             lambda x, d: d * (1 - jnp.tanh(x) ** 2)),
            ("sq", lambda x: jnp.mean(x ** 2), lambda x, d: d * (2.5 if wrong else 2.0) * x / x.size)]

z = jax.device_put(np.linspace(-1.0, 1.0, 8).astype(np.float32), NamedSharding(mesh, P("data")))
with jax.set_mesh(mesh):
    for wrong in (False, True):
        out[f"placed_{wrong}"] = row(fg.verify.check_grad(placed_loss, ps, xs, hand=placed_hand(wrong)))
        out[f"jac_{wrong}"] = row(fg.verify.check_jacobian(jax.nn.softmax, z, softmax_jac(wrong)))
        r = fg.verify.check_chain(chain(wrong), xs)
        out[f"chain_{wrong}"] = [r.verdict, r.first_broken]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded():
    return json.loads(run_python(["-c", SCRIPT], env=EIGHT, timeout=600).stdout.strip().splitlines()[-1])


def test_inputs_really_are_sharded_in_their_types(sharded):
    assert sharded["types"] == ["float32[8,12@model]", "float32[16@data,8]"]


def test_check_grad_of_sharded_parameters_reads_as_on_one_device(sharded):
    assert sharded["grad_False"][0] == "ok"
    assert sharded["grad_True"][:2] == sharded["grad_True_plain"][:2] == ["hand_wrong", ["(3, 5)"]]
    assert any("sharded along explicit mesh axes" in n for n in sharded["grad_True"][2])


def test_check_vjp_of_a_sharded_primal(sharded):
    assert sharded["vjp_False"][0] == "ok"
    assert sharded["vjp_True"][0] == "hand_wrong"


@pytest.mark.parametrize("inside", [False, True])
def test_audit_of_a_rule_whose_inputs_are_sharded(sharded, inside):
    """Sharded at the inputs (the rule then sees them replicated) or by fn itself (the rule's input placed along
    the data axis: its bwd must be handed a cotangent of that type)."""
    assert sharded[f"audit_False_{inside}"][0] == "ok", sharded[f"audit_False_{inside}"]
    assert sharded[f"audit_True_{inside}"][0] == "autodiff_wrong", sharded[f"audit_True_{inside}"]


def test_a_hand_whose_output_is_placed_as_fn_places_its_activations(sharded):
    # (its gradient comes out float32[8,12@model]: the check's flattening raised JAX's ShardingTypeError, h103)
    assert sharded["placed_False"][0] == "ok", sharded["placed_False"]
    assert sharded["placed_True"][:2] == ["hand_wrong", ["(3, 5)"]], sharded["placed_True"]


def test_check_jacobian_and_check_chain_with_placed_values(sharded):
    assert sharded["jac_False"][0] == "ok" and sharded["jac_True"][0] == "hand_wrong"
    assert sharded["chain_False"] == ["ok", None] and sharded["chain_True"] == ["hand_wrong", "sq"]
