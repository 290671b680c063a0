"""Three behaviours of the fixed-point simulation, printed for a checkout (docs/RESULTS.md).

  python scripts/engine_checks.py [path/to/checkout]   # default: this repository
"""
import sys, jax, jax.numpy as jnp, numpy as np, optax
import os
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fwdgrad
from fwdgrad import models, qzo
# 1. zero-initialised bias under QZO-FF.
x = jax.random.normal(jax.random.key(0), (64, 4)); w = jax.random.normal(jax.random.key(1), (4, 2)) * 0.5
target = x @ w + jnp.array([0.5, -0.3]); params = {"dense": {"kernel": w, "bias": jnp.zeros(2)}}
loss = lambda p: jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - target) ** 2)
tx = fwdgrad.qzo_ff(2e-2, key=0, num_directions=3); state = tx.init(params)
step = jax.jit(lambda p, s: tx.update(p, s, p, value_fn=loss))
for _ in range(150):
  u, state = step(params, state); params = optax.apply_updates(params, u)
print("zero bias after 150 steps:", np.asarray(params["dense"]["bias"]), "eps_q", int(state.epsilon_q["dense"]["bias"]))
# 2. sharpness radius on a 1700x1700 leaf (2.9M weights, about ViT-tiny's blocks) with w_max = 2.
p2 = {"w": jnp.linspace(-2.0, 2.0, 1700 * 1700).reshape(1700, 1700)}
tx2 = fwdgrad.qzo_ff(1e-3, key=0, num_directions=1, sharpness_radius=0.05)
s2 = tx2.init(p2)
scale = float(s2.weight_scale["w"]); fmt = qzo.perturbation_format()
# The old rule rounded one coefficient rho / (Delta_w Delta_z ||u_q||) to an integer before the
# multiply by the integer u_q: 0 at this size. The rule now rounds per entry (default irwin_hall z).
u_q = np.asarray(qzo.sample_quantized_direction(jax.random.key(0), p2, fmt, "irwin_hall")["w"], np.float64)
print("old rule coefficient:", round(0.05 / (scale * fmt.scale * np.linalg.norm(u_q))))
steps = np.round(u_q * 0.05 / (np.linalg.norm(u_q) * scale))
print("per-entry ascent now: max |step|", int(np.max(np.abs(steps))), "weight steps,",
      f"{np.mean(steps != 0):.3f} of entries move")
# 3. batch dependence (old: dynamic).
m = models.get_model("conv4", num_classes=3, features=(4, 4), precision="16w8a")
xb = jax.random.normal(jax.random.key(6), (6, 12, 12, 1)); v = m.init(jax.random.key(7), xb[:1])
if hasattr(models, "calibrate"): v = models.calibrate(m, v, xb)
a = m.apply(v, xb)[:1]; b = m.apply(v, jnp.concatenate([xb[:1], 3.0 * xb[1:]]))[:1]
print("batch dependence of example 0:", float(jnp.max(jnp.abs(a - b))))
