"""Forward-gradient estimators: gradients from forward calls only.

Both estimators are pure functions shaped like :func:`jax.value_and_grad`: they take the objective,
the parameters and a PRNG key and return ``(loss, grads)`` with ``grads`` shaped like ``params``.

Directions are drawn per leaf from the key and regenerated from it rather than stored. A step
first probes the ``m`` directions one after another inside a :func:`jax.lax.fori_loop`, keeping
only one scalar per direction (the loss difference or the JVP's slope), and then forms
``sum_i c_i z_i`` by drawing each ``z_i`` again: the perturbed point (or the JVP's tangent) and
the gradient are never alive together, so the step holds the parameters and one more
parameter-sized buffer, for any ``m``. With a fused sampler (``"fast_gaussian"``,
``"fast_rademacher"``, ``"irwin_hall"``, see :func:`counter_bits`) no direction is ever stored.
The same key gives a bit-identical result.

References:
  Baydin et al., "Gradients without Backpropagation", 2022 (the forward gradient).
  Spall, "Multivariate stochastic approximation using a simultaneous perturbation gradient
  approximation", 1992 (SPSA).
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (sign-m-SPSA, Def. 3).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import jax
import jax.extend
import jax.numpy as jnp

from fwdgrad import objective

PyTree = Any
Sampler = Callable[[jax.Array, tuple, Any], jax.Array]

DISTRIBUTIONS = ("gaussian", "rademacher", "fast_gaussian", "fast_rademacher", "irwin_hall")
# Bell-shaped, bounded (|z| <= 3.45, like the paper's 8-bit z with z_max = 3.5), unit-variance
# directions that XLA generates inside their consumers (see counter_bits): the cheapest to draw,
# and they never cost memory. "gaussian" is jax.random.normal; "fast_gaussian" is N(0, 1) drawn
# like irwin_hall but through erfinv, several times slower on CPU.
DEFAULT_DISTRIBUTION = "irwin_hall"


def _gaussian(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def _rademacher(key, shape, dtype):
  return jax.random.rademacher(key, shape, dtype)


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of ``uint32`` with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _popcount32(x: jax.Array) -> jax.Array:
  """Set bits of a ``uint32`` by shifts and masks (edge runtimes such as IREE's vmvx lack popcount)."""
  x = x - ((x >> 1) & jnp.uint32(0x55555555))
  x = (x & jnp.uint32(0x33333333)) + ((x >> 2) & jnp.uint32(0x33333333))
  x = (x + (x >> 4)) & jnp.uint32(0x0F0F0F0F)
  return (x * jnp.uint32(0x01010101)) >> 24


def counter_bits(key: jax.Array, shape) -> jax.Array:
  """Random ``uint32`` words as a pure elementwise function of (key, element index).

  Word ``k`` is ``mix(γ k + δ)`` (modulo ``2**32``), with ``mix`` MurmurHash3's finalizer and the
  odd multiplier ``γ`` and offset ``δ`` hashed once from the key's words (scalar work): every
  key walks its own Weyl sequence, as SplitMix does with its per-stream gamma, so the words of two
  keys are not shifts or permutations of each other. Every element is computed from its own index,
  with no state shared between elements, so XLA fuses the generation into whatever consumes it
  (``w + εz`` or ``g + c z``): the words are never stored. One ``mix`` per element makes drawing
  a direction cost about a memory pass (an MLP's 670k parameters: 0.16 ms against 0.07 ms for
  ``2w + 1`` and 0.22 ms with two ``mix`` es). ``jax.random.bits`` on CPU runs threefry in a
  rolled loop over arrays of the output's size, which keeps about four times the output alive and
  takes several times longer (``benchmarks/run.py`` measures both). The words are not
  cryptographic; they are meant for perturbation directions, whose keys come from
  ``jax.random.fold_in`` and so are themselves threefry outputs.

  Args:
    key: a PRNG key (typed, or a raw ``uint32`` key array).
    shape: output shape; at most ``2**32`` elements.

  Returns:
    A ``uint32`` array of ``shape``.
  """
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  if size > 2**32:
    raise ValueError(f"counter_bits draws at most 2**32 elements per key, got shape {shape}; "
                     "split the leaf or use distribution='gaussian'.")
  if jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.asarray(key).astype(jnp.uint32).reshape(-1)
  seed = _mix32(words[0] ^ jnp.uint32(0x9E3779B9))
  for index in range(1, words.shape[0]):
    seed = _mix32(seed + words[index])
  gamma = _mix32(seed ^ jnp.uint32(0x6A09E667)) | jnp.uint32(1)
  # A multiplier with few 01/10 bit transitions (such as 1) makes neighbouring inputs differ in
  # few bits; SplitMix's remedy flips every other bit (gamma stays odd).
  transitions = _popcount32(gamma ^ (gamma >> 1))
  gamma = jnp.where(transitions < 12, gamma ^ jnp.uint32(0xAAAAAAAA), gamma)
  offset = _mix32(seed + jnp.uint32(0xBB67AE85))
  # Hashed as a flat vector and reshaped last (a free bitcast), so that XLA fuses the whole
  # chain into the consumer for leaves of any rank.
  x = jax.lax.iota(jnp.uint32, size) * gamma + offset
  return _mix32(x).reshape(shape)


def _fast_gaussian(key, shape, dtype):
  # 23 random bits give u = (k + 1/2) 2^-22 - 1, symmetric in (-1, 1) and never ±1.
  k = (counter_bits(key, shape) >> 9).astype(jnp.float32)
  u = (k + 0.5) * (2.0 ** -22) - 1.0
  return (math.sqrt(2.0) * jax.lax.erf_inv(u)).astype(dtype)


def _fast_rademacher(key, shape, dtype):
  top = (counter_bits(key, shape) >> 31).astype(jnp.float32)
  return (1.0 - 2.0 * top).astype(dtype)


_IRWIN_HALL_STD = math.sqrt(4 * (256**2 - 1) / 12)


def _irwin_hall(key, shape, dtype):
  bits = counter_bits(key, shape)
  total = (bits & 255) + ((bits >> 8) & 255) + ((bits >> 16) & 255) + (bits >> 24)
  return ((total.astype(jnp.int32) - 510).astype(jnp.float32) / _IRWIN_HALL_STD).astype(dtype)


_SAMPLERS = {"gaussian": _gaussian, "rademacher": _rademacher, "fast_gaussian": _fast_gaussian,
             "fast_rademacher": _fast_rademacher, "irwin_hall": _irwin_hall}


def get_sampler(distribution: Union[str, Sampler]) -> Sampler:
  """A ``sampler(key, shape, dtype) -> array`` for a distribution name, or the callable itself.

  Names:
    ``"gaussian"``: ``jax.random.normal`` (threefry).
    ``"rademacher"``: ``jax.random.rademacher`` (threefry), ±1.
    ``"fast_gaussian"``: N(0, 1) (``√2 erfinv`` of a uniform) from :func:`counter_bits`.
    ``"fast_rademacher"``: ±1 from the top bit of :func:`counter_bits`.
    ``"irwin_hall"``: the sum of the four bytes of :func:`counter_bits`, centred and scaled to
    unit variance: a 10-bit, bell-shaped noise bounded by ``|z| <= 3.45`` (kurtosis 2.7 against
    the Gaussian's 3), the default.

  The ``fast_*`` and ``irwin_hall`` samplers are fused by XLA into their consumers, so a training
  step never stores a direction; the threefry ones are the reference draws of ``jax.random``.
  Samplers must draw i.i.d. zero-mean, unit-variance entries for the estimators to be unbiased.
  """
  if callable(distribution):
    return distribution
  if distribution not in _SAMPLERS:
    raise ValueError(
        f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS} or a callable "
        "sampler(key, shape, dtype).")
  return _SAMPLERS[distribution]


def _check_num_directions(num_directions) -> int:
  if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
    hint = ""
    if isinstance(num_directions, jax.Array):
      hint = (" It sets the number of forward calls, so it cannot be traced: with "
              "optax.inject_hyperparams, list it in static_args=('num_directions',).")
    raise ValueError(f"num_directions must be a positive Python int, got "
                     f"{'an array' if hint else repr(num_directions)}.{hint}")
  return num_directions


def check_float_leaves(tree: PyTree, name: str = "params", *,
                       empty: str = "there is nothing to perturb",
                       why: str = "forward gradients perturb floating-point leaves only",
                       fn: str = "value_fn") -> None:
  """Raises a ValueError naming the first non-float leaf of ``tree``, or an empty ``tree``."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    raise ValueError(f"{name} has no array leaves: {empty}.")
  for path, leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; {why}. Close "
          f"over integer state in {fn} instead of passing it in {name}.")


def _check_params(params: PyTree) -> None:
  objective.check_params(params)
  check_float_leaves(params)


def sample_direction(key: jax.Array, params: PyTree, distribution: Union[str, Sampler] = DEFAULT_DISTRIBUTION):
  """One random direction shaped like ``params``, each leaf from ``fold_in(key, leaf_index)``.

  Args:
    key: PRNG key of this direction.
    params: pytree of float arrays (only shapes and dtypes are used).
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.

  Returns:
    A pytree like ``params``.
  """
  sampler = get_sampler(distribution)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  directions = [
      sampler(jax.random.fold_in(key, index), jnp.shape(leaf), jnp.result_type(leaf))
      for index, leaf in enumerate(leaves)
  ]
  return jax.tree_util.tree_unflatten(treedef, directions)


def direction_key(key: jax.Array, index) -> jax.Array:
  """The key of direction ``index`` within a step keyed by ``key``."""
  return jax.random.fold_in(key, index)


def _axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
  """``alpha * x + y`` leafwise, in each leaf's dtype."""
  return jax.tree_util.tree_map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _zeros_like(params: PyTree) -> PyTree:
  return jax.tree_util.tree_map(jnp.zeros_like, params)


# Loops over at most this many directions are unrolled: XLA keeps an extra copy of the
# parameters around a while loop that reads them, the memory a step is meant to save.
UNROLL_DIRECTIONS = 8


def direction_loop(num_directions: int, body, init):
  """``jax.lax.fori_loop(0, num_directions, body, init)``, unrolled for a few directions."""
  return jax.lax.fori_loop(0, num_directions, body, init,
                           unroll=num_directions <= UNROLL_DIRECTIONS)


def _opaque_zero(after: jax.Array) -> jax.Array:
  """``uint32`` zero that XLA can neither fold nor compute before ``after`` (see fresh_key)."""
  return (jnp.sum(jnp.asarray(after, jnp.float32)) * 0.0).astype(jnp.uint32)


def fresh_key(key: jax.Array, after: jax.Array) -> jax.Array:
  """The same key, as a value XLA can neither prove equal to ``key`` nor compute before ``after``.

  Both matter for memory. Regenerating a direction from equal keys would be merged by
  common-subexpression elimination, which keeps the whole direction alive between its uses,
  exactly the buffer that regenerating avoids. And work that may start before the forward call
  reading the previous point has finished cannot reuse that point's buffer: XLA would copy it.
  ``0 * after`` is zero for every finite ``after`` and NaN otherwise, and both convert to the
  unsigned zero, so the key's value never changes; XLA does not fold ``x * 0`` for floats, so the
  dependency stays. (An optimization barrier does not survive XLA's CPU pipeline for this.)
  """
  zero = _opaque_zero(after)
  if jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    data = jax.random.key_data(key) + zero
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))
  return key + zero


def computed_after(value: jax.Array, tree: PyTree) -> PyTree:
  """``tree`` unchanged, bit for bit, as values XLA can only compute once ``value`` is known.

  Each float leaf gets ``-0.0`` added (which leaves every float, zeros' signs included,
  unchanged); the ``-0.0`` is computed from ``value`` and XLA does not fold ``x * 0`` for floats,
  so the dependency survives compilation. Two calls with different ``value`` s are two different
  computations to XLA: whatever is derived from each is recomputed next to its consumer instead
  of being shared and kept alive in between.
  """
  value = jnp.sum(jnp.asarray(value, jnp.float32))
  negative_zero = -jnp.abs(jnp.where(jnp.isfinite(value), value * 0.0, 0.0))
  return jax.tree_util.tree_map(lambda leaf: leaf + negative_zero.astype(leaf.dtype), tree)


def frozen_share(fn: Callable[[PyTree], jax.Array], point: PyTree) -> float:
  """The share of the bytes ``fn(point)`` computes that do not depend on ``point``.

  Read from ``fn``'s jaxpr: every value computed from ``point`` counts as moving, the rest as
  frozen. Close to 1 when ``fn`` runs a frozen backbone under a trained head (linear probing),
  close to 0 when every layer is trained.
  """
  return _frozen_share(jax.make_jaxpr(fn)(point))


def _frozen_share(closed) -> float:
  moving = set(closed.jaxpr.invars)
  frozen_bytes = moving_bytes = 0
  for eqn in closed.jaxpr.eqns:
    size = sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
               for v in eqn.outvars if hasattr(v.aval, "dtype"))
    if any(isinstance(v, jax.extend.core.Var) and v in moving for v in eqn.invars):
      moving.update(eqn.outvars)
      moving_bytes += size
    else:
      frozen_bytes += size
  return frozen_bytes / max(frozen_bytes + moving_bytes, 1)


# call_apart keeps the calls inline when at least this share of the loss's work is frozen.
INLINE_FROZEN_SHARE = 0.5


def _never_value(s):
  """A placeholder of ``s``'s shape and dtype: NaN for floats, 0 (or key 0) otherwise."""
  if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
    impl = getattr(s.dtype, "_impl", None)
    data = jax.random.key_data(jax.random.key(0, impl=impl))
    return jax.random.wrap_key_data(jnp.zeros(s.shape + data.shape, data.dtype), impl=impl)
  return jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact) else 0, s.dtype)


def keep_first(index, value: PyTree, kept: PyTree) -> PyTree:
  """``value`` at ``index == 0``, ``kept`` after: the aux of a step's first call, any dtype."""
  if value is None:
    return None
  return jax.lax.cond(index == 0, lambda: value, lambda: kept)


def aux_placeholder(fn: Callable[[PyTree], Any], point: PyTree) -> PyTree:
  """A placeholder shaped like the aux of ``fn(point) = (loss, aux)`` (traced, never run)."""
  shapes = jax.eval_shape(fn, point)[1]
  return jax.tree_util.tree_map(_never_value, shapes)


def call_apart(fn: Callable[[PyTree], jax.Array], point: PyTree, *, after: jax.Array) -> jax.Array:
  """``fn(point)``, compiled as a computation of its own and run once ``after`` is known.

  A step makes 2m forward calls of the same function. Inlined, XLA merges what they have in
  common, constants included: a ReLU's zero, broadcast to the activation's shape, is one buffer
  shared by every call, and XLA:CPU then writes it out in full and reads it in each forward
  instead of generating it inside the layer (Conv4 at batch 32: 73 MiB of zeros, and the two
  forwards of an SPSA step took 98 ms against 74 ms for two separate inference calls). Each call
  goes into one branch of a :func:`jax.lax.cond` whose predicate is always true but not known to
  XLA (built like :func:`fresh_key`), so nothing is merged across calls and a call cannot start
  before ``after``. The other branch returns NaN and never runs.

  Where most of ``fn``'s work does not depend on ``point`` (a frozen backbone: see
  :func:`frozen_share`) the call stays inline: XLA then computes that part once for all 2m
  calls, which is worth more than what merging costs.

  ``point`` is what crosses into the call, and XLA writes a branch's operands out in full: pass
  buffers that exist anyway (the parameters) and small values (a key), and let ``fn`` build the
  perturbed point from them. Passing ``w + εz`` itself costs a parameter-sized buffer
  (ResNet18 at batch 32: an SPSA step at 1.38x inference memory instead of 1.00x). Values ``fn``
  closes over are passed the same way, and :func:`frozen_share` sees only ``point`` as moving.
  Inside a rolled loop (more than 8 directions) XLA still copies the loop-invariant parameters
  once on their way into the call.
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(point)
  if _frozen_share(closed) >= INLINE_FROZEN_SHARE:
    return fn(point)
  never = lambda point: jax.tree_util.tree_map(_never_value, shapes)
  return jax.lax.cond(_opaque_zero(after) == 0, fn, never, point)


def accumulate_directions(key: jax.Array, params: PyTree, coefficients: jax.Array,
                          sampler: Union[str, Sampler], *, after: jax.Array) -> PyTree:
  """``sum_i coefficients[i] z_i`` with ``z_i`` regenerated from ``direction_key(key, i)``.

  The directions are drawn again, one at a time, once ``after`` is known, so the sum is the only
  parameter-sized buffer alive (with a fused sampler; see :func:`counter_bits`).
  """
  sampler = get_sampler(sampler)

  def body(index, grads):
    z = sample_direction(fresh_key(direction_key(key, index), after), params, sampler)
    return _axpy(coefficients[index], z, grads)

  return direction_loop(coefficients.shape[0], body, _zeros_like(params))


def _first_elements(tree: PyTree) -> jax.Array:
  """The sum of the first element of every leaf: a scalar that depends on each leaf of ``tree``."""
  return sum(jnp.reshape(leaf, (-1,))[0].astype(jnp.float32)
             for leaf in jax.tree_util.tree_leaves(tree))


def _distinct_primal(after: jax.Array, params: PyTree) -> PyTree:
  """``params`` with its vector leaves (biases, norm scales) made to depend on ``after``.

  Two reasons, both memory. The primal half of every direction's jvp is the same computation; XLA
  would run it once and keep all its activations alive for the m tangent passes, which is
  backprop's memory (28x inference on ViT-tiny with m = 3). And the primal must not start before
  the tangent ``z`` is drawn: XLA's scheduler would otherwise run the primal chain a layer or more
  ahead of the tangent chain, keeping a layer's activations alive until the tangent catches up
  (Conv4 at batch 32: 3.25x inference, against 2.34x with ``after`` the first elements of ``z``;
  a sum over all of ``z`` does as well but keeps the whole direction alive, 2.9x on a
  parameter-bound MLP). Layers downstream of a leaf passed through :func:`computed_after` wait
  for ``after`` and are distinct per direction. Vector leaves are enough (every normalisation or
  biased layer has one) and cost nothing to copy; only if there are none is every leaf copied.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  vectors = [jnp.ndim(leaf) <= 1 for leaf in leaves]
  if not any(vectors):
    vectors = [True] * len(leaves)
  leaves = [computed_after(after, leaf) if vector else leaf
            for leaf, vector in zip(leaves, vectors)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def jvp_grad(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    num_directions: int = 1,
    distribution: Union[str, Sampler] = DEFAULT_DISTRIBUTION,
    has_aux: bool = False,
):
  """Forward gradient with exact directional derivatives from :func:`jax.jvp`.

  .. math::

     g(w) = \\frac{1}{m} \\sum_{i=1}^{m} (\\nabla f(w) \\cdot z_i)\\, z_i,
     \\qquad z_i \\sim \\mathcal{N}(0, I) \\text{ or Rademacher}

  :math:`\\mathbb{E}[g] = \\nabla f(w)` because :math:`\\mathbb{E}[z z^T] = I`.

  Args:
    value_fn: scalar float objective ``f(params)``, a pure, deterministic function of the params
      (close over the batch; every direction must see the same one).
    params: pytree of float arrays.
    key: PRNG key; direction ``i`` uses ``fold_in(key, i)``.
    num_directions: ``m``, a Python int.
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is the unperturbed call's.

  Returns:
    ``(loss, grads)``: ``loss = f(params)`` (exact, from the JVP's primal output) and the estimate;
    ``((loss, aux), grads)`` with ``has_aux``, as :func:`jax.value_and_grad` gives.

  Examples:
    >>> f = lambda p: jnp.sum(p["w"] ** 2)
    >>> loss, g = fwdgrad.jvp_grad(f, {"w": jnp.ones(3)}, jax.random.key(0), num_directions=4)
  """
  num_directions = _check_num_directions(num_directions)
  _check_params(params)
  sampler = get_sampler(distribution)
  fn = objective.checked(value_fn, has_aux)

  def probe(index, carry):
    _, slopes, aux = carry
    # Drawn once the previous direction is done, so two tangents are never alive together.
    z = sample_direction(fresh_key(direction_key(key, index), slopes), params, sampler)
    loss, slope, new_aux = jax.jvp(fn, (_distinct_primal(_first_elements(z), params),), (z,),
                                   has_aux=True)
    return (loss, slopes.at[index].set(slope.astype(jnp.float32)),
            keep_first(index, new_aux, aux))

  aux = aux_placeholder(fn, params) if has_aux else None
  init = (jnp.zeros((), jnp.float32), jnp.zeros((num_directions,), jnp.float32), aux)
  loss, slopes, aux = direction_loop(num_directions, probe, init)
  grads = accumulate_directions(key, params, slopes / num_directions, sampler, after=slopes)
  return ((loss, aux) if has_aux else loss), grads


def spsa_grad(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    num_directions: int = 1,
    epsilon: float = 1e-3,
    distribution: Union[str, Sampler] = DEFAULT_DISTRIBUTION,
    sign: bool = False,
    has_aux: bool = False,
):
  """SPSA (two forward calls per direction, central difference), or the paper's sign-m-SPSA.

  .. math::

     \\hat g(w) = \\frac{1}{m} \\sum_{i=1}^{m} c_i z_i, \\qquad
     c_i = \\frac{f(w + \\epsilon z_i) - f(w - \\epsilon z_i)}{2 \\epsilon}
     \\quad\\text{or, with } \\texttt{sign=True},\\quad
     c_i = \\mathrm{sign}(f(w + \\epsilon z_i) - f(w - \\epsilon z_i))

  With ``sign=True`` the estimate has the range of ``z`` (so a static 8-bit format holds it) and is
  invariant to the scale of the loss. On a quadratic the central difference equals the directional
  derivative exactly.

  Args:
    value_fn: scalar float objective ``f(params)``; only ever called, never differentiated. It
      must be a pure, deterministic function of the params: the 2m calls of a step must see the
      same batch and the same dropout key, or the loss difference measures that noise.
    params: pytree of float arrays.
    key: PRNG key; direction ``i`` uses ``fold_in(key, i)``.
    num_directions: ``m``, a Python int.
    epsilon: perturbation size ``ε``.
    distribution: a name in ``fwdgrad.estimators.DISTRIBUTIONS`` (default ``"irwin_hall"``,
      see :func:`fwdgrad.estimators.get_sampler`) or a ``sampler(key, shape, dtype)``.
    sign: keep only the sign of the loss difference (sign-m-SPSA).
    has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is the first call's,
      ``f(w + ε z_1)``'s (there is no unperturbed call).

  Returns:
    ``(loss, grads)`` where ``loss`` is the mean over directions of
    ``(f(w + εz) + f(w - εz)) / 2``, which equals ``f(w)`` up to ``O(ε²)``; no extra forward call
    is spent on the unperturbed loss. ``((loss, aux), grads)`` with ``has_aux``.

  Examples:
    >>> loss, g = fwdgrad.spsa_grad(f, params, jax.random.key(0), num_directions=3, sign=True)
  """
  num_directions = _check_num_directions(num_directions)
  _check_params(params)
  objective.check_epsilon(epsilon, "spsa_grad")
  sampler = get_sampler(distribution)
  fn = objective.checked(value_fn, has_aux)

  def perturbed(scale):
    def loss_at(operands):
      # The point is built inside the call: only the parameters and a key go into it.
      params, direction = operands
      return fn(_axpy(scale, sample_direction(direction, params, sampler), params))
    return loss_at

  def probe(index, carry):
    loss_sum, coefficients, aux = carry
    direction = direction_key(key, index)
    loss_plus, aux_plus = call_apart(perturbed(epsilon), (params, fresh_key(direction, loss_sum)),
                                     after=loss_sum)
    loss_minus, _ = call_apart(perturbed(-epsilon), (params, fresh_key(direction, loss_plus)),
                               after=loss_plus)
    difference = loss_plus - loss_minus
    coefficient = jnp.sign(difference) if sign else difference / (2.0 * epsilon)
    loss_sum = loss_sum + 0.5 * (loss_plus + loss_minus)
    return (loss_sum, coefficients.at[index].set(coefficient),
            keep_first(index, aux_plus, aux))

  aux = aux_placeholder(fn, params) if has_aux else None
  init = (jnp.zeros((), jnp.float32), jnp.zeros((num_directions,), jnp.float32), aux)
  loss_sum, coefficients, aux = direction_loop(num_directions, probe, init)
  grads = accumulate_directions(key, params, coefficients / num_directions, sampler,
                                after=coefficients)
  loss = loss_sum / num_directions
  return ((loss, aux) if has_aux else loss), grads
