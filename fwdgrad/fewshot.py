"""Few-shot heads: ProtoNets and SimpleShot, as pure functions of feature arrays.

An *episode* has a labelled support set :math:`\\{(x_j, y_j)\\}` of ``num_classes`` classes and a
query set. Both heads classify a query by its distance to one centroid per class, computed from the
support features :math:`f(x_j)` of a backbone:

* ProtoNets (Snell et al., 2017): prototypes
  :math:`c_k = \\frac{1}{|S_k|} \\sum_{j \\in S_k} f(x_j)` and logits
  :math:`-\\lVert f(x) - c_k \\rVert^2`.
* SimpleShot (Wang et al., 2019), "CL2N": every feature is centred with a mean feature
  :math:`\\bar f` (the base-class mean when known, else the support mean) and L2-normalised,
  :math:`g(x) = (f(x) - \\bar f) / \\lVert f(x) - \\bar f \\rVert`; then nearest centroid, i.e.
  ProtoNets on :math:`g`.

The same logits give zero-shot predictions (:func:`episode_predictions`, no adaptation) and a
differentiable adaptation objective (:func:`episode_loss`, the cross-entropy of the query logits
given the support), through which :func:`jax.jvp`, :func:`jax.grad` and the forward-gradient
estimators all run.

References:
  Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.
  Wang, Chao, Weinberger, van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor Classification
  for Few-Shot Learning", 2019.
  Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024, Sec. 4 (the heads used).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

METHODS = ("protonet", "simpleshot")

# Added under the square root of SimpleShot's norm so that a zero feature has a finite tangent.
_NORM_EPSILON = 1e-12


def _flatten_features(features: jax.Array, name: str) -> jax.Array:
  if jnp.ndim(features) < 2:
    raise ValueError(f"{name} must be (num_examples, ...) features, got shape "
                     f"{jnp.shape(features)}.")
  return jnp.reshape(features, (jnp.shape(features)[0], -1))


def _check_labels(labels: jax.Array, features: jax.Array, name: str) -> None:
  if jnp.shape(labels) != (jnp.shape(features)[0],):
    raise ValueError(f"{name} must have shape ({jnp.shape(features)[0]},), one integer label per "
                     f"example, got {jnp.shape(labels)}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{name} must be integer class indices, got dtype {jnp.result_type(labels)}.")


def _check_num_classes(num_classes) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive Python int (the ways of the episode), got "
                     f"{num_classes!r}.")
  return num_classes


def prototypes(support_features: jax.Array, support_labels: jax.Array,
               num_classes: int) -> jax.Array:
  """Class prototypes, the mean support feature of each class.

  .. math:: c_k = \\frac{1}{|S_k|} \\sum_{j: y_j = k} f(x_j)

  Args:
    support_features: ``(num_support, ...)`` features; trailing axes are flattened.
    support_labels: ``(num_support,)`` integer labels in ``[0, num_classes)``.
    num_classes: number of classes (ways), a Python int.

  Returns:
    ``(num_classes, feature_dim)`` prototypes; a class without support examples gets zeros.

  Examples:
    >>> protos = prototypes(jnp.array([[0., 0.], [2., 0.], [0., 4.]]), jnp.array([0, 0, 1]), 2)
    >>> protos
    Array([[1., 0.],
           [0., 4.]], dtype=float32)
  """
  num_classes = _check_num_classes(num_classes)
  features = _flatten_features(support_features, "support_features")
  _check_labels(support_labels, features, "support_labels")
  one_hot = jax.nn.one_hot(support_labels, num_classes, dtype=features.dtype)
  counts = jnp.sum(one_hot, axis=0)
  sums = jnp.einsum("nk,nd->kd", one_hot, features)
  return sums / jnp.maximum(counts, 1)[:, None]


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pairwise squared Euclidean distances, ``(n, d), (k, d) -> (n, k)``.

  Computed from differences rather than
  :math:`\\lVert x\\rVert^2 - 2 x\\cdot y + \\lVert y\\rVert^2`, which cancels badly in low
  precision.
  """
  return jnp.sum(jnp.square(x[:, None, :] - y[None, :, :]), axis=-1)


def protonet_logits(query_features: jax.Array, protos: jax.Array) -> jax.Array:
  """ProtoNets logits, the negative squared distance of each query to each prototype.

  .. math:: \\mathrm{logit}_k(x) = -\\lVert f(x) - c_k \\rVert^2

  Args:
    query_features: ``(num_query, ...)`` features; trailing axes are flattened.
    protos: ``(num_classes, feature_dim)`` from :func:`prototypes`.

  Returns:
    ``(num_query, num_classes)`` logits.
  """
  query = _flatten_features(query_features, "query_features")
  if jnp.ndim(protos) != 2 or jnp.shape(protos)[1] != query.shape[1]:
    raise ValueError(f"protos must be (num_classes, {query.shape[1]}) to match the query "
                     f"features, got {jnp.shape(protos)}.")
  return -squared_distances(query, protos)


def feature_mean(features: jax.Array) -> jax.Array:
  """The mean feature SimpleShot centres with, e.g. over base-class training features."""
  return jnp.mean(_flatten_features(features, "features"), axis=0)


def center_and_normalize(features: jax.Array, mean: jax.Array) -> jax.Array:
  """SimpleShot's CL2N transform: subtract ``mean``, then scale each row to unit L2 norm.

  .. math:: g(x) = \\frac{f(x) - \\bar f}{\\sqrt{\\lVert f(x) - \\bar f \\rVert^2 + 10^{-12}}}
  """
  features = _flatten_features(features, "features")
  if jnp.shape(mean) != (features.shape[1],):
    raise ValueError(f"mean must have shape ({features.shape[1]},) like one flattened feature, "
                     f"got {jnp.shape(mean)}.")
  centred = features - mean
  return centred * jax.lax.rsqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True)
                                 + _NORM_EPSILON)


def simpleshot_logits(query_features: jax.Array, support_features: jax.Array,
                      support_labels: jax.Array, num_classes: int, *,
                      mean: Optional[jax.Array] = None) -> jax.Array:
  """SimpleShot logits: ProtoNets logits on centred, L2-normalised features.

  .. math:: \\mathrm{logit}_k(x) = -\\lVert g(x) - \\tfrac{1}{|S_k|}\\textstyle\\sum_{j \\in S_k}
     g(x_j) \\rVert^2

  with :math:`g` from :func:`center_and_normalize`.

  Args:
    query_features: ``(num_query, ...)`` features.
    support_features: ``(num_support, ...)`` features.
    support_labels: ``(num_support,)`` integer labels.
    num_classes: number of classes, a Python int.
    mean: ``(feature_dim,)`` centring feature, the base-class mean when known; ``None`` uses the
      support mean.

  Returns:
    ``(num_query, num_classes)`` logits.
  """
  support = _flatten_features(support_features, "support_features")
  if mean is None:
    mean = jnp.mean(support, axis=0)
  support = center_and_normalize(support, mean)
  query = center_and_normalize(query_features, mean)
  return protonet_logits(query, prototypes(support, support_labels, num_classes))


def episode_logits(support_features: jax.Array, support_labels: jax.Array,
                   query_features: jax.Array, num_classes: int, *, method: str = "protonet",
                   mean: Optional[jax.Array] = None, scale: float = 1.0) -> jax.Array:
  """Query logits of an episode by ``method`` (one of :data:`METHODS`), times ``scale``.

  ``scale`` is a softmax temperature for :func:`episode_loss` (SimpleShot distances lie in
  ``[0, 4]``, so its unscaled cross-entropy is flat); it does not change predictions.
  """
  if method not in METHODS:
    raise ValueError(f"unknown few-shot method {method!r}; expected one of {METHODS}.")
  if method == "protonet":
    if mean is not None:
      raise ValueError('mean= is SimpleShot\'s centring feature; use method="simpleshot".')
    logits = protonet_logits(query_features,
                             prototypes(support_features, support_labels, num_classes))
  else:
    logits = simpleshot_logits(query_features, support_features, support_labels, num_classes,
                               mean=mean)
  return scale * logits


def episode_loss(support_features: jax.Array, support_labels: jax.Array,
                 query_features: jax.Array, query_labels: jax.Array, num_classes: int, *,
                 method: str = "protonet", mean: Optional[jax.Array] = None,
                 scale: float = 1.0) -> jax.Array:
  """Mean cross-entropy of the query labels under the episode's logits.

  .. math:: L = -\\frac{1}{|Q|} \\sum_{(x, y) \\in Q} \\log \\mathrm{softmax}(\\mathrm{logits}(x))_y

  Differentiable in the features (and so in the backbone that computes them) by
  :func:`jax.grad` and :func:`jax.jvp`.

  Args:
    support_features, support_labels, query_features, num_classes, method, mean, scale: as in
      :func:`episode_logits`.
    query_labels: ``(num_query,)`` integer labels.

  Returns:
    A scalar loss.

  Examples:
    >>> def loss_fn(params):
    ...   features = model.apply(params, jnp.concatenate([support_x, query_x]))
    ...   support, query = features[:len(support_x)], features[len(support_x):]
    ...   return episode_loss(support, support_y, query, query_y, 5)
  """
  logits = episode_logits(support_features, support_labels, query_features, num_classes,
                          method=method, mean=mean, scale=scale)
  _check_labels(query_labels, logits, "query_labels")
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, query_labels))


def episode_predictions(support_features: jax.Array, support_labels: jax.Array,
                        query_features: jax.Array, num_classes: int, *,
                        method: str = "protonet",
                        mean: Optional[jax.Array] = None) -> jax.Array:
  """Predicted query labels, the nearest centroid: ``(num_query,)`` int32."""
  logits = episode_logits(support_features, support_labels, query_features, num_classes,
                          method=method, mean=mean)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def episode_accuracy(support_features: jax.Array, support_labels: jax.Array,
                     query_features: jax.Array, query_labels: jax.Array, num_classes: int, *,
                     method: str = "protonet", mean: Optional[jax.Array] = None) -> jax.Array:
  """Fraction of query examples whose predicted label is right (a float32 scalar).

  Without adaptation this is the zero-shot baseline of the paper.
  """
  predictions = episode_predictions(support_features, support_labels, query_features,
                                    num_classes, method=method, mean=mean)
  _check_labels(query_labels, predictions[:, None], "query_labels")
  return jnp.mean((predictions == query_labels).astype(jnp.float32))
