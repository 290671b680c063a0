"""fwdgrad: forward-gradient training of JAX/Flax models in fixed point.

The public API:

Fixed point (``fwdgrad.quant``)
  ``fake_quant``        round to a signed symmetric fixed-point grid, straight-through tangent.
  ``quantize``          floats -> (int8/int16/int32 array, scale).
  ``dequantize``        (integers, scale) -> floats.
  ``compute_scale``     the step size Δ of a format ("max", "mse", "static", "pow2").

Estimators (``fwdgrad.estimators``), shaped like ``jax.value_and_grad``
  ``jvp_grad``          forward gradient (∇f·z) z with ``jax.jvp``.
  ``spsa_grad``         central-difference SPSA; ``sign=True`` is the paper's sign-m-SPSA.
  ``sample_direction``  the direction pytree a key stands for.

Optax (``fwdgrad.transform``)
  ``forward_gradient``  GradientTransformationExtraArgs returning the estimate; chain it with any
                        optimizer and pass ``value_fn=`` to ``update``.
  ``ForwardGradientState``
"""

from fwdgrad.estimators import jvp_grad
from fwdgrad.estimators import sample_direction
from fwdgrad.estimators import spsa_grad
from fwdgrad.quant import compute_scale
from fwdgrad.quant import dequantize
from fwdgrad.quant import fake_quant
from fwdgrad.quant import quantize
from fwdgrad.transform import ForwardGradientState
from fwdgrad.transform import forward_gradient

__version__ = "0.1.0"

__all__ = (
    "ForwardGradientState",
    "compute_scale",
    "dequantize",
    "fake_quant",
    "forward_gradient",
    "jvp_grad",
    "quantize",
    "sample_direction",
    "spsa_grad",
)
