"""The CPU panel kernel (jaxaccel.cpu_kernels.panel_matmul) against a float64 product on fresh shapes."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxaccel.cpu_kernels import panel_matmul as pm

pytestmark = pytest.mark.skipif(not pm.available(), reason="the panel kernel does not run on this machine")


def test_pack_panels_layout():
    w_kn = np.arange(5 * 48, dtype=np.float32).reshape(5, 48)
    panels = np.asarray(pm.pack_panels(jnp.asarray(w_kn)))
    assert panels.shape == (3, 5, 16)
    np.testing.assert_array_equal(panels[2, 4], w_kn[4, 32:48])


@pytest.mark.parametrize("seed", range(4))
def test_panel_matmul_equals_the_product(seed):
    rng = np.random.default_rng(seed)
    for _ in range(6):
        rows, k, n = int(rng.integers(1, 20)), int(rng.integers(1, 700)), 16 * int(rng.integers(1, 40))
        lead = (rows,) if rng.random() < 0.5 else (1, rows)  # any leading axes are rows
        x = rng.standard_normal(lead + (k,)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        y = np.asarray(jax.jit(pm.panel_matmul)(jnp.asarray(x), pm.pack_panels(jnp.asarray(w))))
        expected = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(y, expected, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(expected).max() + 1e-6)


def test_a_rows_result_does_not_depend_on_the_other_rows():
    # A token's logits in a tree verification equal its logits in an AR step, bit for bit.
    rng = np.random.default_rng(7)
    # 16 rows run as three blocks taking turns over k in chunks; K = 700 ends mid-chunk.
    x = jnp.asarray(rng.standard_normal((16, 700)).astype(np.float32))
    panels = pm.pack_panels(jnp.asarray(rng.standard_normal((700, 192)).astype(np.float32)))
    whole = np.asarray(pm.panel_matmul(x, panels))
    for m in (1, 4, 7, 8, 13):
        np.testing.assert_array_equal(np.asarray(pm.panel_matmul(x[:m], panels)), whole[:m])
    np.testing.assert_array_equal(np.asarray(pm.panel_matmul(x[5:6], panels)), whole[5:6])
    np.testing.assert_array_equal(np.asarray(pm.panel_matmul(x[9:], panels)), whole[9:])


def test_bad_operands_are_named():
    panels = pm.pack_panels(jnp.ones((8, 32), jnp.float32))
    with pytest.raises(ValueError, match="float32 x \\[..., K\\] and panels"):
        pm.panel_matmul(jnp.ones((2, 9), jnp.float32), panels)
    with pytest.raises(ValueError, match="float32"):
        pm.panel_matmul(jnp.ones((2, 8), jnp.bfloat16), panels)
    assert not pm.packable(jnp.ones((8, 30), jnp.float32)) and not pm.packable(jnp.ones((8, 32), jnp.bfloat16))
