"""fwdgrad: forward-gradient training of JAX/Flax models in fixed point.

The public API (notebooks and examples use only these names):

Fixed point
  ``fake_quant``             round to a signed symmetric fixed-point grid, straight-through tangent.
  ``quantize`` / ``dequantize``  floats <-> (int8/int16/int32 array, scale).
  ``compute_scale``          the step size Δ of a format ("max", "mse", "static", "pow2").
  ``fixed_point_weights``    optax transform keeping any optimizer's params on a weight grid.
  ``weight_scales``          the weight grids (Δ_w per leaf) that ``qzo_ff``, ``fixed_point_weights``
                             and a calibrated model share; a zero leaf gets its layer's range.

Estimators, shaped like ``jax.value_and_grad``
  ``jvp_grad``               forward gradient (∇f·z) z with ``jax.jvp``.
  ``spsa_grad``              central-difference SPSA; ``sign=True`` is the paper's sign-m-SPSA.
  ``sample_direction``       the direction pytree a key stands for.
  ``DISTRIBUTIONS``          direction laws: "irwin_hall" (default), "fast_gaussian",
                             "fast_rademacher" (counter-based: XLA draws them inside their
                             consumers, never stored) and jax.random's "gaussian", "rademacher".

Optax transforms (pass ``value_fn=loss_fn`` to ``update``)
  ``forward_gradient``       the estimate as a GradientTransformationExtraArgs; chain any optimizer.
  ``qzo_ff``                 the paper's integer QZO-FF step (16-bit weights, 8-bit z and g);
                             ``FrozenLeafWarning`` names leaves it cannot perturb or move.
  ``enhanced_forward_gradient``  sign-m-SPSA with momentum-guided sampling / sharpness-aware
                             perturbation; ``MomentumGuidedSampling`` configures the former.
  ``kernelwise_normalize``, ``masked_update``, ``sparse_update_mask``, ``binomial_sampler``.
  ``step_loss`` / ``step_aux``   the last update's loss (no extra forward call) and, with
                             ``has_aux=True``, its aux, read from any optimizer state;
                             ``init_with_aux`` gives a ``has_aux`` state its final structure.
  ``NonFiniteLossWarning``   raised from the host when value_fn returns NaN or inf.
  ``value_fn`` must return a float scalar and be a pure, deterministic function of the params;
  a non-scalar, tuple or integer output is a one-line error that names the fix.

Flax
  ``apply_forward_gradient(state, value_fn)``   a Linen ``TrainState`` step (``apply_gradients``
                             drops ``value_fn``).
  ``nnx_update(optimizer, model, loss_fn, *batch)``   an ``nnx.Optimizer`` step with no gradients;
                             ``nnx_value_fn`` builds the objective over an NNX model's params.

Training at inference memory, and on many devices
  ``fused_spsa_step`` / ``make_fused_train_step``   MeZO-style step: perturb and update the params in
                             place, directions regenerated from the key, no gradient pytree.
  ``packed_rademacher``, ``blockwise_sampler``   32 signs per threefry word / threefry in blocks.
  ``make_mesh``, ``make_parallel_train_step``, ``sharded_spsa_grad``   directions (and data) spread
                             over devices; only scalar losses cross devices.
  ``step_memory``, ``time_step``   XLA's memory accounting of a jitted step; median step time.

Adaptation
  ``select_trainable`` / ``partition`` / ``merge`` / ``bind_frozen``   FT, LP, D-VPT, sparse update
                             as a partition of the params, so only what is trained is perturbed.
  ``LinearHead``             LP-1 / LP-3 heads.
  ``prototypes``, ``protonet_logits``, ``simpleshot_logits``, ``episode_loss``,
  ``episode_accuracy``       few-shot heads (ProtoNets, SimpleShot).

Loss landscapes
  ``random_directions`` (filter-normalized), ``pca_directions`` (of a trajectory),
  ``loss_surface``, ``project_trajectory``, ``plot_surfaces``, ``save_surface``, ``load_surface``.

Experiments
  ``train_and_evaluate(config, workdir)``  what ``train.py`` runs; ``default_config()``.

Sub-packages: ``fwdgrad.models`` (``get_model``, ``Precision``, quantized layers, backbones,
``calibrate`` and ``weight_scales`` for a fixed-point model's static scales, checkpoint import),
``fwdgrad.data`` (``load_dataset``, few-shot episodes) and ``fwdgrad.edge`` (the true-integer
forward compiled by IREE and QZO-FF driven by it; ``python -m fwdgrad.edge``; the ``edge`` extra).
"""

from fwdgrad import data
from fwdgrad import models
from fwdgrad.adapt import LinearHead
from fwdgrad.adapt import bind_frozen
from fwdgrad.adapt import merge
from fwdgrad.adapt import partition
from fwdgrad.adapt import select_trainable
from fwdgrad.enhancements import MomentumGuidedSampling
from fwdgrad.enhancements import binomial_sampler
from fwdgrad.enhancements import enhanced_forward_gradient
from fwdgrad.enhancements import kernelwise_normalize
from fwdgrad.enhancements import masked_update
from fwdgrad.enhancements import sparse_update_mask
from fwdgrad.estimators import DISTRIBUTIONS
from fwdgrad.estimators import jvp_grad
from fwdgrad.estimators import sample_direction
from fwdgrad.estimators import spsa_grad
from fwdgrad.experiment import default_config
from fwdgrad.fewshot import episode_accuracy
from fwdgrad.fewshot import episode_loss
from fwdgrad.fewshot import protonet_logits
from fwdgrad.fewshot import prototypes
from fwdgrad.fewshot import simpleshot_logits
from fwdgrad.fixed_point import fixed_point_weights
from fwdgrad.flax_steps import apply_forward_gradient
from fwdgrad.flax_steps import nnx_update
from fwdgrad.flax_steps import nnx_value_fn
from fwdgrad.fixed_point import weight_scales
from fwdgrad.fused import blockwise_sampler
from fwdgrad.fused import fused_spsa_step
from fwdgrad.fused import make_fused_train_step
from fwdgrad.fused import packed_rademacher
from fwdgrad.landscape import load_surface
from fwdgrad.landscape import loss_surface
from fwdgrad.landscape import pca_directions
from fwdgrad.landscape import plot_surfaces
from fwdgrad.landscape import project_trajectory
from fwdgrad.landscape import random_directions
from fwdgrad.landscape import save_surface
from fwdgrad.parallel import make_mesh
from fwdgrad.parallel import make_parallel_train_step
from fwdgrad.parallel import sharded_spsa_grad
from fwdgrad.objective import NonFiniteLossWarning
from fwdgrad.objective import init_with_aux
from fwdgrad.objective import step_aux
from fwdgrad.objective import step_loss
from fwdgrad.profiling import step_memory
from fwdgrad.profiling import time_step
from fwdgrad.quant import compute_scale
from fwdgrad.quant import dequantize
from fwdgrad.quant import fake_quant
from fwdgrad.quant import quantize
from fwdgrad.qzo import FrozenLeafWarning
from fwdgrad.qzo import QZOState
from fwdgrad.qzo import qzo_ff
from fwdgrad.train_lib import train_and_evaluate
from fwdgrad.transform import ForwardGradientState
from fwdgrad.transform import forward_gradient

__version__ = "0.1.0"

__all__ = (
    "DISTRIBUTIONS",
    "ForwardGradientState",
    "FrozenLeafWarning",
    "LinearHead",
    "MomentumGuidedSampling",
    "NonFiniteLossWarning",
    "QZOState",
    "apply_forward_gradient",
    "bind_frozen",
    "binomial_sampler",
    "blockwise_sampler",
    "compute_scale",
    "data",
    "default_config",
    "dequantize",
    "enhanced_forward_gradient",
    "episode_accuracy",
    "episode_loss",
    "fake_quant",
    "fixed_point_weights",
    "forward_gradient",
    "fused_spsa_step",
    "init_with_aux",
    "jvp_grad",
    "kernelwise_normalize",
    "load_surface",
    "loss_surface",
    "make_fused_train_step",
    "make_mesh",
    "make_parallel_train_step",
    "masked_update",
    "merge",
    "models",
    "nnx_update",
    "nnx_value_fn",
    "packed_rademacher",
    "partition",
    "pca_directions",
    "plot_surfaces",
    "project_trajectory",
    "protonet_logits",
    "prototypes",
    "quantize",
    "qzo_ff",
    "random_directions",
    "sample_direction",
    "save_surface",
    "select_trainable",
    "sharded_spsa_grad",
    "simpleshot_logits",
    "spsa_grad",
    "step_aux",
    "step_loss",
    "step_memory",
    "time_step",
    "train_and_evaluate",
    "weight_scales",
)
