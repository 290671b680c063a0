"""Adapting a pre-trained backbone to one task, by the methods the paper compares.

A *task* is a labelled training set (the support set of a few-shot episode, or the training split of
a transfer task) and a labelled test set (the query set). A *method* adapts on the first and is
scored on the second:

==============  ==================================================================================
``zero_shot``   no adaptation: the pre-trained features with the head (ProtoNets / SimpleShot)
``backprop``    ``jax.grad`` of the adaptation loss, any optax optimizer (the baseline)
``ff``          forward gradient with ``jax.jvp`` (:func:`fwdgrad.forward_gradient`, ``"jvp"``)
``spsa``        SPSA or sign-m-SPSA from two forward calls per direction
``qzo_ff``      the paper's integer QZO-FF (:func:`fwdgrad.qzo_ff`): 16-bit weight grid, 8-bit z
==============  ==================================================================================

Each method runs the backbone at its own ``precision`` (``"float"``, ``"16w8a"``, ``"8w8a"``, ...).
What is trained is a partition of the parameters (:mod:`fwdgrad.adapt`): ``mode="ft"`` the whole
backbone, ``"dvpt"`` the ViT's prompt tokens, ``"lp"`` nothing of the backbone; optionally made
sparse. The head is ``"protonet"`` / ``"simpleshot"`` (no parameters: the loss is the episode loss
on the support set, prototypes from the support set) or ``"linear"`` / ``"mlp3"`` (LP-1 / LP-3
heads trained with cross-entropy; a linear head starts as the ProtoNets classifier of the support
set, so adaptation starts from the zero-shot predictions), ``"pretrained"``: LP-1 from the
pre-trained classifier (transfer tasks on the pre-training's classes, as the paper's OOD runs;
zero-shot is that classifier), or ``"random"``: LP-1 from a new, randomly initialised decoder (the
paper's cross-domain runs; zero-shot is that random decoder, each task drawing its own).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fwdgrad
from fwdgrad import adapt
from fwdgrad import fewshot
from fwdgrad import models

METHOD_KINDS = ("zero_shot", "backprop", "ff", "spsa", "qzo_ff")
MODES = ("ft", "lp", "dvpt")
HEADS = ("protonet", "simpleshot", "linear", "mlp3", "pretrained", "random")
OPTIMIZERS = ("sgd", "momentum", "adam")
OBJECTIVES = ("support", "views")
_SIMPLESHOT_TEMPERATURE = 10.0


class Task(NamedTuple):
  """One adaptation problem; labels are ``0 .. num_classes - 1``."""
  support_inputs: np.ndarray
  support_labels: np.ndarray
  query_inputs: np.ndarray
  query_labels: np.ndarray


class TaskResult(NamedTuple):
  accuracy: float
  losses: np.ndarray  # The training loss at each adaptation step.


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}.")


def make_transform(method, key: jax.Array,
                   weight_scale=None) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of a method config (see :data:`METHOD_KINDS`).

  The paper's enhancements (Sec. 3.4) are method fields: ``momentum`` (momentum-guided sampling
  with :class:`fwdgrad.MomentumGuidedSampling`'s defaults) and ``sharpness_radius`` (``ρ`` of the
  sharpness-aware ascent step, 0 for off) for ``spsa`` (through
  :func:`fwdgrad.enhanced_forward_gradient`) and ``qzo_ff`` (its own integer options), and
  ``kernelwise`` (kernel-wise normalization, ``ĝ^i ‖w^i‖ / ‖ĝ^i‖`` per leaf) for ``ff``, ``spsa``
  (:func:`fwdgrad.kernelwise_normalize` before the optimizer) and ``qzo_ff``. The 90%-sparse
  update is ``config.adapt.sparsity`` (a partition of the parameters, for every method).
  ``distribution="binomial"`` is the paper's name for Rademacher (±1) perturbations.
  ``weight_scale`` is the grid of a calibrated fixed-point model for ``qzo_ff``
  (:func:`fwdgrad.models.weight_scales`, shaped like the trained params).

  Examples:
    >>> method = fwdgrad.experiment.method("spsa", sharpness_radius=0.05, kernelwise=True)
    >>> tx = make_transform(method, jax.random.key(0))
  """
  kind = method.kind
  distribution = method.distribution
  momentum = fwdgrad.MomentumGuidedSampling() if method.get("momentum", False) else None
  radius = float(method.get("sharpness_radius", 0.0)) or None
  kernelwise = bool(method.get("kernelwise", False))
  if kind == "backprop":
    return optax.with_extra_args_support(make_optimizer(method.optimizer, method.learning_rate))
  if kind in ("ff", "spsa"):
    if distribution == "binomial":
      distribution = "rademacher"
    if kind == "spsa" and (momentum is not None or radius is not None):
      estimate = fwdgrad.enhanced_forward_gradient(
          key=key, num_directions=method.num_directions, epsilon=method.epsilon, sign=method.sign,
          distribution=distribution, momentum=momentum, sharpness_radius=radius)
    else:
      estimate = fwdgrad.forward_gradient(
          "jvp" if kind == "ff" else "spsa", key=key, num_directions=method.num_directions,
          epsilon=method.epsilon, distribution=distribution,
          sign=kind == "spsa" and method.sign)
    normalize = [fwdgrad.kernelwise_normalize()] if kernelwise else []
    return optax.chain(estimate, *normalize,
                       make_optimizer(method.optimizer, method.learning_rate))
  if kind == "qzo_ff":
    precision = models.Precision.parse(method.precision)
    return fwdgrad.qzo_ff(method.learning_rate, key=key, num_directions=method.num_directions,
                          epsilon=method.epsilon, weight_bits=precision.weight_bits or 16,
                          distribution=distribution, momentum=momentum,
                          sharpness_radius=radius, kernelwise=kernelwise,
                          axis=-1 if precision.per_channel else None,
                          weight_scale=weight_scale)
  raise ValueError(f"unknown method kind {kind!r}; expected one of {METHOD_KINDS}.")


def augmented_views(inputs: jax.Array, key: jax.Array, *, axes=(1,), shift: float = 0.1,
                    noise: float = 0.1) -> jax.Array:
  """A random view of each example: circular shifts and additive Gaussian noise.

  Each of ``axes`` (input axes, 0 is the batch) is rolled by its own random offset per example,
  up to ``shift`` times its length either way; noise of ``noise`` times the standard deviation of
  ``inputs`` is added. Views of a 1-shot support set are the pseudo-queries of the ``"views"``
  objective: the episode loss then asks the backbone to keep a view nearer its own prototype than
  the others, which is not satisfied by construction as the support set itself is.
  """
  keys = jax.random.split(key, len(axes) + 1)
  out = inputs
  for axis_key, axis in zip(keys, axes):
    reach = int(round(shift * inputs.shape[axis]))
    if reach:
      offsets = jax.random.randint(axis_key, (inputs.shape[0],), -reach, reach + 1)
      out = jax.vmap(lambda x, o, a=axis: jnp.roll(x, o, axis=a - 1))(out, offsets)
  if noise:
    out = out + (noise * jnp.std(inputs)) * jax.random.normal(keys[-1], inputs.shape, inputs.dtype)
  return out


def _trainable_scales(scales, frozen):
  """The weight grids of the trained part of a :func:`fwdgrad.adapt.partition` (None if frozen).

  A whole trained leaf keeps its scale; a sparse one gets the scale of each selected entry.
  """
  def pick(frozen_leaf, scale):
    if frozen_leaf is None:
      return scale
    if isinstance(frozen_leaf, adapt.SparseLeaf):
      if scale is None or jnp.size(scale) == 1:
        return None if scale is None else jnp.reshape(scale, ())
      return jnp.ravel(jnp.broadcast_to(scale, jnp.shape(frozen_leaf.base)))[frozen_leaf.indices]
    return None
  return jax.tree_util.tree_map(pick, frozen, scales,
                                is_leaf=lambda x: x is None or isinstance(x, adapt.SparseLeaf))


def _batched_features(apply_fn, params, inputs, batch_size: int):
  """Features of ``inputs`` computed ``batch_size`` at a time (bounded activation memory)."""
  n = inputs.shape[0]
  if n <= batch_size:
    return apply_fn(params, inputs)
  pad = (-n) % batch_size
  padded = jnp.concatenate([inputs, jnp.zeros((pad,) + inputs.shape[1:], inputs.dtype)])
  chunks = padded.reshape((-1, batch_size) + inputs.shape[1:])
  features = jax.lax.map(lambda x: apply_fn(params, x), chunks)
  return features.reshape((-1,) + features.shape[2:])[:n]


def _pretrained_head(variables: dict, num_classes: int) -> dict:
  """The pre-trained classifier's ``{"kernel", "bias"}``, checked against the task's classes."""
  head = (variables.get("head") or {}).get("params")
  if not head:
    raise ValueError("config.adapt.head = 'pretrained' needs the pre-trained classifier, which this "
                     "backbone does not hold (a backbone saved before heads were kept, or imported "
                     "weights); pre-train again, or use head 'linear' (LP-1 from ProtoNets).")
  kernel = head["kernel"]
  if kernel.shape[-1] != num_classes:
    raise ValueError(f"config.adapt.head = 'pretrained': the pre-trained classifier has "
                     f"{kernel.shape[-1]} classes but the task has {num_classes}; a pre-trained "
                     "head fits only the pre-training's classes (use 'linear' otherwise).")
  return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(head["bias"])}


def _widen_kernel_scales(quant, factor: float):
  """``quant`` with every ``kernel_scale`` and output scale (``act_out``) times ``factor``.

  Both ranges were calibrated on the initial head: the weights cannot grow past the kernel's, nor
  the logits past the output's (an engine's static scales), so both get the room.
  """
  if not hasattr(quant, "items"):
    return quant
  out = {}
  for name, value in quant.items():
    if name == "kernel_scale" or (name == "act_out" and hasattr(value, "items")):
      out[name] = jax.tree_util.tree_map(lambda x: x * factor, value)
    else:
      out[name] = _widen_kernel_scales(value, factor)
  return out


class Adapter:
  """Adapts a backbone to tasks with one method; build once, call per task.

  Args:
    model_name, model_kwargs: the backbone (``fwdgrad.models.get_model``), features only.
    variables: the pre-trained ``{"params", "batch_stats"}`` of the backbone (no head), and its
      ``"head"`` (``{"params": {"kernel", "bias"}}``) where ``adapt_config.head = "pretrained"``.
    method: a method config (``kind``, ``precision``, ``learning_rate``, ``optimizer``,
      ``num_directions``, ``epsilon``, ``distribution``, ``sign``, ``steps``).
    adapt_config: ``mode``, ``head``, ``sparsity``, ``sparse_method``, ``batch_size``,
      ``eval_batch_size``, ``head_hidden``.
    num_classes: ways of the tasks.
    seed: for the sparse random mask and the method's keys.
    base_mean: SimpleShot's centring feature (mean base-class feature), optional.
    calibration_inputs: examples that fix the static scales of a fixed-point backbone once
      (pre-training data, :func:`fwdgrad.models.calibrate` with ``adapt_config.calibration``);
      ``None``: each task's support set calibrates it. A fixed-point head is calibrated on the
      support features of each task.
  """

  def __init__(self, model_name: str, model_kwargs: dict, variables: dict, method, adapt_config,
               num_classes: int, seed: int, base_mean: Optional[np.ndarray] = None,
               calibration_inputs: Optional[np.ndarray] = None):
    self.method = method
    self.config = adapt_config
    self.num_classes = num_classes
    self.steps = 0 if method.kind == "zero_shot" else int(method.steps)
    self.model = models.get_model(model_name, num_classes=None, precision=method.precision,
                                  **model_kwargs)
    self.batch_stats = variables.get("batch_stats", {})
    self.base_mean = None if base_mean is None else jnp.asarray(base_mean)
    params = variables["params"]
    self.fixed_point = not models.Precision.parse(method.precision).is_float
    self.quant = None  # The backbone's static scales; None: calibrated on each support set.
    if self.fixed_point and calibration_inputs is not None:
      self.quant = self._calibrate(params, jnp.asarray(calibration_inputs))
    mode, head = adapt_config.mode, adapt_config.head
    if mode == "lp":
      self.trainable_backbone, self.frozen = {}, params
    else:
      selection = adapt.select_trainable(
          params, "dvpt" if mode == "dvpt" else "ft", sparsity=adapt_config.sparsity,
          sparse_method=adapt_config.sparse_method, key=jax.random.key(seed),
          train_head=False)
      self.trainable_backbone, self.frozen = adapt.partition(params, selection)
    self.parametric_head = head in ("linear", "mlp3", "pretrained", "random")
    self.pretrained_head = None
    if head == "pretrained":
      self.pretrained_head = _pretrained_head(variables, num_classes)
    if self.parametric_head:
      dense = functools.partial(models.QDense, precision=method.precision)
      self.head = adapt.LinearHead(num_classes, num_layers=3 if head == "mlp3" else 1,
                                   hidden=adapt_config.head_hidden or None, dense=dense)
    self._run = jax.jit(self._adapt_and_evaluate)
    if self.method.kind == "backprop" and mode != "lp" and self.steps:
      self._jitted = dict(setup=jax.jit(self._setup), evaluate=jax.jit(self._evaluate),
                          step=jax.jit(self._backprop_step))
      self._run = self._adapt_and_evaluate_stepwise

  def _calibrate(self, params, inputs):
    variables = {"params": params, "batch_stats": self.batch_stats}
    calibrated = models.calibrate(self.model, variables, inputs, method=self.config.calibration,
                                  batch_size=self.config.eval_batch_size, train=False)
    return calibrated.get(models.layers.QUANT, {})

  def _variables(self, backbone_params, quant):
    variables = {"params": backbone_params, "batch_stats": self.batch_stats}
    if quant:
      variables[models.layers.QUANT] = quant
    return variables

  def features(self, backbone_params, inputs, quant=None):
    quant = self.quant if quant is None else quant
    apply = lambda p, x: self.model.apply(self._variables(p, quant), x, train=False)
    return _batched_features(apply, backbone_params, inputs, self.config.eval_batch_size)

  def _init_head(self, key, support_features, support_labels):
    if self.pretrained_head is not None:
      return jax.tree_util.tree_map(lambda w: w.astype(support_features.dtype),
                                    {"dense_0": self.pretrained_head})
    variables = self.head.init(key, support_features[:1])
    head = variables["params"]
    if self.config.head == "linear":
      # Start from the ProtoNets classifier: -|x - p|^2 = 2 x.p - |p|^2 - |x|^2 (|x|^2 is shared).
      protos = fewshot.prototypes(support_features, support_labels, self.num_classes)
      head = {"dense_0": {"kernel": (2.0 * protos.T).astype(support_features.dtype),
                          "bias": -jnp.sum(protos ** 2, axis=-1).astype(support_features.dtype)}}
    return head

  def _head_quant(self, head, support_features):
    """The head's static scales, calibrated on the support features (none in float)."""
    if not self.fixed_point:
      return {}
    calibrated = models.calibrate(self.head, {"params": head}, support_features, batch_size=None,
                                  method=self.config.calibration)
    quant = calibrated.get(models.layers.QUANT, {})
    head_range = float(self.method.get("head_range", 1.0))
    if head_range != 1.0:  # Coarser grids with room to grow; the forward and update share them.
      quant = _widen_kernel_scales(quant, head_range)
    return quant

  def _head_apply(self, head, head_quant, features):
    variables = {"params": head}
    if head_quant:
      variables[models.layers.QUANT] = head_quant
    return self.head.apply(variables, features)

  def _temperature(self, features) -> float:
    """Softmax temperature of the episode loss (predictions do not depend on it).

    Squared distances between pre-trained features are large enough to saturate the softmax (the
    loss is 0 and nothing trains); by default ProtoNets distances are divided by the feature
    width, i.e. the loss sees the mean squared difference per feature; so are the logits of a
    linear head, which starts as the ProtoNets classifier (its weights keep their natural scale,
    which is what fixed-point rounding sees). SimpleShot distances of unit vectors lie in [0, 4],
    and its default temperature is 0.1.
    """
    if self.config.temperature:
      return float(self.config.temperature)
    if self.config.head == "simpleshot":
      return 1.0 / _SIMPLESHOT_TEMPERATURE
    return float(np.prod(features.shape[1:]))

  def _setup(self, trainable_backbone, frozen, task: Task, key):
    """What every step of a task reads (``context``) and the initial ``trainable`` parameters.

    ``context``: the backbone's and head's static scales, the frozen features (LP) and the keys.
    """
    head_key, method_key, batch_key = jax.random.split(key, 3)
    xs, ys, xq, _ = task
    mode = self.config.mode
    initial_backbone = frozen if mode == "lp" else adapt.merge(trainable_backbone, frozen)
    quant = self.quant
    if self.fixed_point and quant is None:  # Static scales from this task's support set.
      quant = self._calibrate(initial_backbone, xs)
    context = dict(quant=quant, head_quant={}, method_key=method_key, batch_key=batch_key)
    if mode == "lp":  # The backbone is frozen: its features are computed once.
      context["support"] = self.features(frozen, xs, quant)
      context["query"] = self.features(frozen, xq, quant)
    trainable = {"backbone": trainable_backbone}
    if self.parametric_head:
      support_features = self._features_of(context, frozen, trainable, xs, "support")
      trainable["head"] = self._init_head(head_key, support_features, ys)
      context["head_quant"] = self._head_quant(trainable["head"], support_features)
    return context, trainable

  def _features_of(self, context, frozen, trainable, inputs, which, index=slice(None)):
    if self.config.mode == "lp":
      return context[which][index]
    return self.features(adapt.merge(trainable["backbone"], frozen), inputs[index],
                         context["quant"])

  def _transform(self, context, frozen, trainable):
    weight_scale = None
    if self.method.kind == "qzo_ff" and self.fixed_point:
      # One grid: QZO-FF trains the kernels on the grids the forward reads.
      initial = frozen if self.config.mode == "lp" else adapt.merge(trainable["backbone"], frozen)
      full = models.weight_scales({"params": initial, models.layers.QUANT: context["quant"]})
      weight_scale = {"backbone": ({} if self.config.mode == "lp"
                                   else _trainable_scales(full, frozen))}
      if self.parametric_head:
        weight_scale["head"] = models.weight_scales({"params": trainable["head"],
                                                     models.layers.QUANT: context["head_quant"]})
    return make_transform(self.method, context["method_key"], weight_scale)

  def _step(self, context, frozen, task: Task, tx, params, opt_state, step):
    """One adaptation step: new parameters and optimizer state, and the step's loss."""
    xs, ys = task.support_inputs, task.support_labels
    head_name = self.config.head
    size = self.config.batch_size
    index = slice(None)
    if size and size < xs.shape[0]:
      index = jax.random.choice(jax.random.fold_in(context["batch_key"], step), xs.shape[0],
                                (size,), replace=False)

    views = None
    if self.config.get("objective", "support") == "views":  # The same views for every forward call of a step.
      view_key = jax.random.fold_in(jax.random.fold_in(context["batch_key"], step), 1)
      views = augmented_views(xs[index], view_key, axes=tuple(self.config.augment_axes),
                              shift=self.config.augment_shift, noise=self.config.augment_noise)

    def value_fn(trainable):
      labels = ys[index]
      feats = self._features_of(context, frozen, trainable, xs, "support", index)
      if self.parametric_head:
        logits = self._head_apply(trainable["head"], context["head_quant"], feats)
        if head_name == "linear":  # Started as the ProtoNets classifier: same temperature.
          logits = logits / self._temperature(feats)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      scale = 1.0 / self._temperature(feats)
      queries = feats
      if self.config.get("objective", "support") == "views":
        queries = self.features(adapt.merge(trainable["backbone"], frozen), views,
                                context["quant"])
      return fewshot.episode_loss(feats, labels, queries, labels, self.num_classes, scale=scale,
                                  **self._episode_kwargs())

    if self.method.kind == "backprop":
      loss, grads = jax.value_and_grad(value_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params, value_fn=value_fn)
    else:
      updates, opt_state = tx.update(params, opt_state, params, value_fn=value_fn)
      loss = fwdgrad.step_loss(opt_state)
    return optax.apply_updates(params, updates), opt_state, loss.astype(jnp.float32)

  def _backprop_step(self, context, frozen, task: Task, params, opt_state, step):
    tx = make_transform(self.method, context["method_key"])  # Backprop's needs no grids.
    return self._step(context, frozen, task, tx, params, opt_state, step)

  def _episode_kwargs(self):
    if self.config.head == "simpleshot":
      return dict(method="simpleshot", mean=self.base_mean)
    return dict(method="protonet")

  def _evaluate(self, context, frozen, task: Task, trainable):
    xs, ys, xq, yq = task
    features_of = functools.partial(self._features_of, context, frozen, trainable)
    if self.parametric_head:
      logits = self._head_apply(trainable["head"], context["head_quant"],
                                features_of(xq, "query"))
      return jnp.mean((jnp.argmax(logits, -1) == yq).astype(jnp.float32))
    return fewshot.episode_accuracy(features_of(xs, "support"), ys, features_of(xq, "query"), yq,
                                    self.num_classes, **self._episode_kwargs())

  def _adapt_and_evaluate(self, trainable_backbone, frozen, task: Task, key):
    """The whole task in one program: the steps run in a ``lax.scan``."""
    context, trainable = self._setup(trainable_backbone, frozen, task, key)
    losses = jnp.zeros((0,), jnp.float32)
    if self.steps:
      tx = self._transform(context, frozen, trainable)

      def step(carry, index):
        params, opt_state, loss = self._step(context, frozen, task, tx, *carry, index)
        return (params, opt_state), loss

      (trainable, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)),
                                            jnp.arange(self.steps))
    return self._evaluate(context, frozen, task, trainable), losses

  def _adapt_and_evaluate_stepwise(self, trainable_backbone, frozen, task: Task, key):
    """The same as :meth:`_adapt_and_evaluate`, one jitted step at a time from Python.

    Backprop through a backbone runs several times slower inside a ``lax.scan`` on the CPU than
    as a jitted step (the backward convolutions lose their fast path in the loop body); the
    forward-only estimators do not, and keep the single program.
    """
    context, trainable = self._jitted["setup"](trainable_backbone, frozen, task, key)
    tx = self._transform(context, frozen, trainable)
    opt_state = tx.init(trainable)
    losses = []
    for index in range(self.steps):
      trainable, opt_state, loss = self._jitted["step"](context, frozen, task, trainable,
                                                        opt_state, index)
      losses.append(loss)
    accuracy = self._jitted["evaluate"](context, frozen, task, trainable)
    return accuracy, jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32)

  def __call__(self, task: Task, key: jax.Array) -> TaskResult:
    task = Task(*(jnp.asarray(a) for a in task))
    accuracy, losses = self._run(self.trainable_backbone, self.frozen, task, key)
    return TaskResult(float(accuracy), np.asarray(losses))
