"""A straightforward PyTorch SPSA step (MeZO's in-place perturbation) to time against fwdgrad.

The models mirror the JAX ones of ``benchmarks/run.py`` layer for layer (an MLP, and Conv4:
four blocks of 3x3 convolution, batch norm in evaluation mode, ReLU and 2x2 max pooling, then a
linear head), in float32 on CPU. The step is MeZO's: for each direction the generator is reset to
the direction's seed and ``z`` is drawn leaf by leaf, ``w += εz``, ``L+``, ``w -= 2εz``, ``L-``,
``w += εz``; then ``w -= η c z`` with ``z`` drawn again. No autograd.

Importing this module needs torch; ``benchmarks/run.py`` skips the comparison when it is missing.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch import nn


def mlp(in_features: int, hidden: tuple, num_classes: int) -> nn.Module:
  layers, width = [], in_features
  for features in hidden:
    layers += [nn.Linear(width, features), nn.ReLU()]
    width = features
  layers.append(nn.Linear(width, num_classes))
  return nn.Sequential(nn.Flatten(), *layers)


def conv4(in_channels: int, image_size: int, num_classes: int, features=(64, 64, 64, 64)):
  layers, channels, size = [], in_channels, image_size
  for width in features:
    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
               nn.MaxPool2d(2)]
    channels, size = width, size // 2
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, num_classes))


def build(name: str, input_shape: tuple, num_classes: int) -> nn.Module:
  """The torch twin of a benchmark model; ``input_shape`` is JAX's ``(batch, ...)`` (NHWC)."""
  if name == "mlp":
    return mlp(int(torch.tensor(input_shape[1:]).prod()), (512, 512), num_classes).eval()
  if name == "conv4":
    return conv4(input_shape[-1], input_shape[1], num_classes).eval()
  raise ValueError(f"no PyTorch twin for model {name!r}; available: mlp, conv4.")


def mezo_step(model, trainable, x, y, seed, *, learning_rate, num_directions, epsilon):
  """One SPSA step on ``trainable`` (a list of parameters), in place. Returns the mean loss."""
  loss_fn = nn.functional.cross_entropy
  generator = torch.Generator()

  def walk(direction_seed, scale):
    generator.manual_seed(direction_seed)
    for param in trainable:
      param.add_(torch.randn(param.shape, generator=generator), alpha=scale)

  coefficients, total = [], 0.0
  with torch.no_grad():
    for i in range(num_directions):
      walk(seed * 1000 + i, epsilon)
      loss_plus = loss_fn(model(x), y).item()
      walk(seed * 1000 + i, -2 * epsilon)
      loss_minus = loss_fn(model(x), y).item()
      walk(seed * 1000 + i, epsilon)
      coefficients.append((loss_plus - loss_minus) / (2 * epsilon))
      total += 0.5 * (loss_plus + loss_minus)
    for i, coefficient in enumerate(coefficients):
      walk(seed * 1000 + i, -learning_rate * coefficient / num_directions)
  return total / num_directions


def time_mezo(name, input_shape, num_classes, *, mode, num_directions, learning_rate=1e-3,
              epsilon=1e-3, warmup=2, repeats=10, threads=None):
  """Median seconds of :func:`mezo_step` after ``warmup`` steps."""
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = build(name, input_shape, num_classes)
  shape = (input_shape[0], input_shape[-1], *input_shape[1:-1]) if name == "conv4" else input_shape
  x = torch.randn(shape)
  y = torch.arange(input_shape[0]) % num_classes
  params = list(model.parameters())
  trainable = params[-2:] if mode == "lp" else params
  for param in params:
    param.requires_grad_(False)
  timings = []
  for step in range(warmup + repeats):
    start = time.perf_counter()
    mezo_step(model, trainable, x, y, step, learning_rate=learning_rate,
              num_directions=num_directions, epsilon=epsilon)
    if step >= warmup:
      timings.append(time.perf_counter() - start)
  return statistics.median(timings)


def time_inference(name, input_shape, num_classes, *, warmup=2, repeats=10):
  """Median seconds of one forward call and loss, no autograd."""
  torch.manual_seed(0)
  model = build(name, input_shape, num_classes)
  shape = (input_shape[0], input_shape[-1], *input_shape[1:-1]) if name == "conv4" else input_shape
  x = torch.randn(shape)
  y = torch.arange(input_shape[0]) % num_classes
  timings = []
  with torch.no_grad():
    for step in range(warmup + repeats):
      start = time.perf_counter()
      nn.functional.cross_entropy(model(x), y).item()
      if step >= warmup:
        timings.append(time.perf_counter() - start)
  return statistics.median(timings)


if __name__ == "__main__":
  # python torch_mezo.py '{"name": "mlp", "input_shape": [32, 784], "num_classes": 10, ...}'
  # Run in its own process so that XLA's CPU threads in the caller do not compete with torch's.
  spec = json.loads(sys.argv[1])
  shape = tuple(spec["input_shape"])
  result = {"inference": time_inference(spec["name"], shape, spec["num_classes"],
                                        warmup=spec["warmup"], repeats=spec["repeats"])}
  for m in spec["directions"]:
    result[str(m)] = time_mezo(spec["name"], shape, spec["num_classes"], mode=spec["mode"],
                               num_directions=m, warmup=spec["warmup"], repeats=spec["repeats"])
  print("RESULT " + json.dumps(result))
