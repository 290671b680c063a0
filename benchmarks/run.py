r"""Memory and speed of forward-gradient training steps against inference and backprop.

For each model and mode (FT: every parameter trained; LP: the linear head only) it compiles, on
the same batch: one inference call (params and batch in, loss out) in float and in 16w8a, a
backprop SGD step, and for each direction law and number of directions m: the optax jvp and SPSA
steps (``forward_gradient`` chained with SGD, params and state donated), the fused in-place SPSA
step (:func:`fwdgrad.fused_spsa_step`) and the QZO-FF 16w8a step (``qzo_ff``). It reports XLA's
memory analysis of each (argument, temp, total = argument + output + temp - alias bytes) with its
ratio to inference, and the median step time after warm-up with its ratio to the forward calls it
makes (2m for SPSA, fused and QZO-FF, m for jvp, one for backprop). Optionally it times a PyTorch
MeZO step on a twin of the model (MLP, Conv4), and the perturbation-parallel step over 1, 2, 4, 8
virtual CPU devices (one subprocess each).

Run from the repository root::

  python benchmarks/run.py --models mlp --distributions fast_gaussian,irwin_hall,gaussian
  python benchmarks/run.py --models conv4,crnn,speech_embedding,resnet12,resnet18,vit_tiny \
      --repeats 2 --warmup 1 --no-scaling --out benchmarks/results/models

Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import fwdgrad
from fwdgrad import fused
from fwdgrad import profiling

HERE = os.path.dirname(os.path.abspath(__file__))
INPUT_SHAPES = {  # per example, NHWC for images
    "mlp": (784,),
    "conv4": (84, 84, 3),          # miniImageNet's size
    "resnet12": (84, 84, 3),
    "resnet18": (96, 96, 3),       # (224 in ImageNet; 96 keeps a CPU run in minutes)
    "vit_tiny": (224, 224, 3),
    "crnn": (128, 64),
    "speech_embedding": (76, 32, 1),
}
# Precision of the QZO-FF rows: the paper's 16-bit weights and 8-bit activations.
QZO_PRECISION = "16w8a"


# Samplers beyond the names fwdgrad.estimators knows.
SAMPLERS = {"packed_rademacher": fused.packed_rademacher}


class MLP(nn.Module):
  """The built-in model: ``784 -> 512 -> 512 -> classes`` with ReLU, head named ``"head"``."""
  num_classes: int = 10
  hidden: tuple = (512, 512)
  precision: str = "float"

  @nn.compact
  def __call__(self, x, train: bool = False):
    from fwdgrad import models  # pylint: disable=g-import-not-at-top
    del train
    x = x.reshape((x.shape[0], -1))
    for features in self.hidden:
      x = nn.relu(models.QDense(features, self.precision)(x))
    return models.QDense(self.num_classes, self.precision, name="head")(x)


def build_model(name: str, precision: str, num_classes: int):
  if name == "mlp":
    return MLP(num_classes=num_classes, precision=precision)
  from fwdgrad import models  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_classes=num_classes, precision=precision)
  if name == "vit_tiny":
    kwargs["image_size"] = INPUT_SHAPES["vit_tiny"][0]
  return models.get_model(name, **kwargs)


def setup(name, batch, precision, num_classes, mode):
  """Model, trainable and frozen variables, a batch, ``loss(trainable, frozen, x, y)`` at
  ``precision`` and the same loss at :data:`QZO_PRECISION` (same parameters)."""
  model = build_model(name, precision, num_classes)
  quantized = build_model(name, QZO_PRECISION, num_classes)
  x = jax.random.normal(jax.random.key(1), (batch, *INPUT_SHAPES[name]), jnp.float32)
  y = jnp.arange(batch) % num_classes
  variables = model.init(jax.random.key(0), x[:1])
  variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
  # The fixed-point model's static scales, calibrated once on the batch (the "quant" collection).
  from fwdgrad import models  # pylint: disable=g-import-not-at-top
  scales = models.calibrate(quantized, variables, x, train=False).get(models.layers.QUANT, {})
  params = dict(variables.pop("params"))
  if mode == "ft":
    trainable, frozen = params, {"variables": variables, "params": {}}
  else:
    head = params.pop("head")
    trainable, frozen = head, {"variables": variables, "params": params}

  def make_loss(model):
    def loss(trainable, frozen, x, y):
      params = dict(frozen["params"])
      if mode == "ft":
        params = trainable
      else:
        params["head"] = trainable
      collections = dict(frozen["variables"])
      if model is quantized and scales:
        collections[models.layers.QUANT] = scales
      logits = model.apply({"params": params, **collections}, x, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss

  return trainable, frozen, x, y, make_loss(model), make_loss(quantized)


def steps(loss, qzo_loss, trainable, key, *, directions, distributions, block_size,
          learning_rate=1e-3):
  """``{name: (fn, args, donate_argnums, forward_calls, reference)}`` of every step to measure.

  ``reference`` names the inference row a step is compared with: ``"inference"`` (float) or
  ``"inference 16w8a"`` for the QZO-FF steps, whose forward calls run the 16w8a model.
  """
  sgd = lambda w, g: jax.tree_util.tree_map(lambda a, b: (a - learning_rate * b).astype(a.dtype),
                                            w, g)
  out = {"inference": (loss, (), (), 1, "inference"),
         f"inference {QZO_PRECISION}": (qzo_loss, (), (), 1, f"inference {QZO_PRECISION}")}

  def backprop(w, frozen, x, y):
    value, grads = jax.value_and_grad(loss)(w, frozen, x, y)
    return sgd(w, grads), value

  out["backprop"] = (backprop, (), (0,), 1, "inference")

  def optax_step(tx, loss):
    def step(w, state, frozen, x, y):
      updates, state = tx.update(w, state, w, value_fn=lambda p: loss(p, frozen, x, y))
      return optax.apply_updates(w, updates), state
    return step

  for distribution_name in distributions:
    tag = f" {distribution_name}"
    distribution = SAMPLERS.get(distribution_name, distribution_name)
    for m in directions:
      for estimator in ("jvp", "spsa"):
        tx = optax.chain(fwdgrad.forward_gradient(estimator, key=key, num_directions=m,
                                                  distribution=distribution),
                         optax.sgd(learning_rate))
        calls = m if estimator == "jvp" else 2 * m
        out[f"{estimator} m={m}{tag}"] = (optax_step(tx, loss), (tx.init(trainable),), (0, 1),
                                         calls, "inference")

      for size in block_size:
        def fused_step(w, key, frozen, x, y, m=m, size=size, distribution=distribution):
          return fused.fused_spsa_step(lambda p: loss(p, frozen, x, y), w, key,
                                       learning_rate=learning_rate, num_directions=m,
                                       distribution=distribution, block_size=size)

        block = "" if size is None else f" block={size}"
        out[f"fused m={m}{tag}{block}"] = (fused_step, (key,), (0,), 2 * m, "inference")

      if isinstance(distribution, str):
        tx = fwdgrad.qzo_ff(learning_rate, key=key, num_directions=m, distribution=distribution)
        out[f"qzo_ff {QZO_PRECISION} m={m}{tag}"] = (
            optax_step(tx, qzo_loss), (tx.init(trainable),), (0, 1), 2 * m,
            f"inference {QZO_PRECISION}")
  return out


# XLA's CPU backend hands some fusions (convolutions, dots and their neighbours) to YNNPACK, which
# allocates its own scratch: memory_analysis() then misses the activations. Memory is therefore
# measured in a child process with those fusions off; time is measured with the default flags.
MEMORY_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
# Time is measured with one change to the defaults. XLA:CPU hands a convolution whose output is
# written out on its own (the primal and tangent convolutions of a jvp, a backprop step's) to
# YNNPACK as an "individual" fusion, which runs on one thread: a 64-channel 3x3 convolution at
# 42x42, batch 32, took 42 ms there against 25 ms on both cores through XLA's own kernel. Inference
# and the SPSA calls are one fused YNNPACK graph either way and compile to the same program. Set
# XLA_FLAGS with any ynn_fusion_type yourself to time something else.
TIME_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _step_args(step_name, trainable, extra, frozen, x, y):
  if step_name.startswith("inference"):
    return (trainable, frozen, x, y)
  return (trainable, *extra, frozen, x, y)


def measure_memory(name, mode, args):
  """``{step: StepMemory._asdict()}`` for every step, measured in this process."""
  trainable, frozen, x, y, loss, qzo_loss = setup(name, args.batch, args.precision,
                                                  args.num_classes, mode)
  table = steps(loss, qzo_loss, trainable, jax.random.key(2), directions=args.directions,
                distributions=args.distributions, block_size=args.block_size)
  memories = {}
  for step_name, (fn, extra, donate, _, _) in table.items():
    start = time.perf_counter()
    memories[step_name] = profiling.step_memory(
        fn, *_step_args(step_name, trainable, extra, frozen, x, y), donate_argnums=donate)._asdict()
    # Progress on stdout for the parent to echo: compiling a large model's steps takes minutes.
    print(f"compiled {name} {mode} {step_name} for memory in {time.perf_counter() - start:.0f}s",
          flush=True)
  return memories


def memory_in_child(name, mode, args):
  flags = (os.environ.get("XLA_FLAGS", "") + " " + MEMORY_XLA_FLAGS).strip()
  command = [sys.executable, os.path.abspath(__file__), "--memory-worker", "--models", name,
             "--modes", mode] + _shared_flags(args)
  # Lines are echoed as they come (compile progress); stderr is kept for a failure report.
  with subprocess.Popen(command, env=dict(os.environ, XLA_FLAGS=flags), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) as child:
    stderr_lines = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(child.stderr), daemon=True)
    reader.start()
    lines = []
    for line in child.stdout:
      if line.startswith("RESULT "):
        lines.append(line)
      else:
        print("  " + line.rstrip(), flush=True)
    child.wait()
    reader.join()
  if child.returncode or not lines:
    print("memory child failed, measuring in this process instead:\n"
          + "".join(stderr_lines)[-2000:])
    return measure_memory(name, mode, args), "default XLA flags"
  return json.loads(lines[-1][len("RESULT "):]), MEMORY_XLA_FLAGS


def measure(name, mode, args):
  memories, flags = memory_in_child(name, mode, args)
  trainable, frozen, x, y, loss, qzo_loss = setup(name, args.batch, args.precision,
                                                  args.num_classes, mode)
  key = jax.random.key(2)
  table = steps(loss, qzo_loss, trainable, key, directions=args.directions,
                distributions=args.distributions, block_size=args.block_size)
  rows, inference = [], {}  # reference step -> (memory, seconds, jitted, args)
  num_trainable = sum(leaf.size for leaf in jax.tree_util.tree_leaves(trainable))
  for step_name, (fn, extra, donate, calls, reference) in table.items():
    call_args = _step_args(step_name, trainable, extra, frozen, x, y)
    memory = profiling.StepMemory(**memories[step_name])
    jitted = jax.jit(fn, donate_argnums=donate)
    fresh = jax.tree_util.tree_map(jnp.copy, call_args)
    carry = None
    if donate:
      carry = lambda out, a, n=len(donate): tuple(out[:n]) + tuple(a[n:])
    start = time.perf_counter()
    seconds = float("nan")
    if not args.memory_only:
      seconds = profiling.time_step(jitted, *fresh, warmup=args.warmup, repeats=args.repeats,
                                    carry=carry)
    wall = time.perf_counter() - start
    if step_name == reference:
      inference[reference] = (memory, seconds, jitted, fresh)
    base_memory, base_seconds = inference[reference][:2]
    row = dict(model=name, mode=mode, step=step_name, forward_calls=calls, reference=reference,
               argument_bytes=memory.argument, output_bytes=memory.output,
               temp_bytes=memory.temp, alias_bytes=memory.alias, total_bytes=memory.total,
               memory_ratio=memory.total / base_memory.total, memory_xla_flags=flags,
               seconds=seconds, time_ratio=seconds / (calls * base_seconds),
               trainable_parameters=int(num_trainable))
    rows.append(row)
    print(f"{name:9s} {mode} {step_name:34s} mem x{row['memory_ratio']:.3f} "
          f"temp {memory.temp / 2**20:8.2f} MiB  {seconds * 1e3:9.2f} ms  "
          f"x{row['time_ratio']:.2f} of {calls} fwd  ({wall:.0f}s)", flush=True)
  if not args.memory_only:
    # The first call timed in a process runs cold (it came out up to 1.6x slow): time each
    # inference again after the steps and divide by the faster of its two medians.
    for reference, (_, first, jitted, fresh) in inference.items():
      again = profiling.time_step(jitted, *fresh, warmup=args.warmup, repeats=args.repeats)
      print(f"{name:9s} {mode} {reference} timed again: {again * 1e3:.2f} ms "
            f"(first {first * 1e3:.2f} ms); ratios use the faster", flush=True)
      for row in rows:
        if row["reference"] == reference:
          row["reference_seconds"] = min(first, again)
          row["time_ratio"] = row["seconds"] / (row["forward_calls"] * row["reference_seconds"])
  return rows


def _shared_flags(args):
  blocks = ",".join("none" if b is None else str(b) for b in args.block_size)
  return ["--batch", str(args.batch), "--precision", args.precision,
          "--num-classes", str(args.num_classes),
          "--directions", ",".join(map(str, args.directions)),
          "--distributions", ",".join(args.distributions), "--block-size", blocks,
          "--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (
              ["--memory-only"] if args.memory_only else [])


def torch_rows(name, mode, args, ours):
  """Times the PyTorch MeZO twin in its own process (so XLA's threads do not compete)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    print(f"skipping the PyTorch comparison: {error}")
    return []
  if name not in ("mlp", "conv4"):
    print(f"skipping the PyTorch comparison: no PyTorch twin of {name!r}")
    return []
  spec = dict(name=name, input_shape=[args.batch, *INPUT_SHAPES[name]],
              num_classes=args.num_classes, mode=mode, directions=args.directions,
              warmup=args.warmup, repeats=args.repeats)
  done = subprocess.run([sys.executable, os.path.join(HERE, "torch_mezo.py"), json.dumps(spec)],
                        capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  if done.returncode or not lines:
    print(f"PyTorch comparison failed:\n{done.stderr[-2000:]}")
    return []
  timings = json.loads(lines[-1][len("RESULT "):])
  inference = timings["inference"]
  rows = []
  for m in args.directions:
    seconds = timings[str(m)]
    # Against our rows with the first distribution asked for (irwin_hall by default; pass
    # fast_gaussian first to compare N(0, 1) draws like torch.randn's).
    tag = args.distributions[0]
    spsa = next(r for r in ours if r["step"] == f"spsa m={m} {tag}")
    fused_rows = [r for r in ours if r["step"].startswith(f"fused m={m} {tag}")]
    row = dict(model=name, mode=mode, step=f"torch mezo m={m}", forward_calls=2 * m,
               seconds=seconds, time_ratio=seconds / (2 * m * inference),
               torch_inference_seconds=inference,
               ours_spsa_over_torch=spsa["seconds"] / seconds,
               ours_fused_over_torch=min(r["seconds"] for r in fused_rows) / seconds)
    rows.append(row)
    print(f"{name:9s} {mode} torch mezo m={m}: {seconds * 1e3:.2f} ms (torch inference "
          f"{inference * 1e3:.2f} ms); ours spsa/torch {row['ours_spsa_over_torch']:.2f}, "
          f"fused/torch {row['ours_fused_over_torch']:.2f}", flush=True)
  return rows


def scaling_worker(args):
  """Runs in a subprocess whose XLA_FLAGS fixed the number of CPU devices."""
  from fwdgrad import parallel  # pylint: disable=g-import-not-at-top
  name, mode = args.models[0], args.modes[0]
  trainable, frozen, x, y, loss, _ = setup(name, args.batch, args.precision, args.num_classes,
                                           mode)
  mesh = parallel.make_mesh(num_data=1)
  results = []
  for m in args.directions:
    step = parallel.make_parallel_train_step(
        lambda w, frozen, x, y: loss(w, frozen, x, y), mesh, learning_rate=1e-3,
        num_directions=m, data_axis=None)
    fresh = jax.tree_util.tree_map(jnp.copy, trainable)
    seconds = profiling.time_step(step, fresh, jax.random.key(2), frozen, x, y,
                                  warmup=args.warmup, repeats=args.repeats,
                                  carry=lambda out, a: (out[0],) + tuple(a[1:]))
    results.append(dict(model=name, mode=mode, devices=jax.device_count(), num_directions=m,
                        seconds=seconds))
  print("RESULT " + json.dumps(results))


def scaling_rows(name, mode, args):
  rows = []
  for devices in args.scaling:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, os.path.abspath(__file__), "--scaling-worker", "--models", name,
               "--modes", mode] + _shared_flags(args)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not lines:
      print(f"scaling with {devices} devices failed:\n{done.stderr[-2000:]}")
      continue
    for result in json.loads(lines[-1][len("RESULT "):]):
      rows.append(result)
      print(f"{name:9s} {mode} parallel spsa m={result['num_directions']} on {devices} devices: "
            f"{result['seconds'] * 1e3:.2f} ms", flush=True)
  return rows


def markdown(results):
  lines = [f"# fwdgrad step benchmark\n", f"{results['environment']}\n",
           "Memory: argument + output + temp - alias bytes of the compiled step, over the same "
           f"figure for one inference call (compiled with XLA_FLAGS={MEMORY_XLA_FLAGS}, so that "
           "XLA accounts for every activation). Time: median seconds after warm-up, over the time of "
           "the forward calls the step makes (2m inference calls for SPSA, the fused step and "
           "QZO-FF, m for jvp, 1 for backprop); the inference is timed before and after the steps "
           "and the faster median is used. QZO-FF rows are measured against the inference "
           "of the same model at 16w8a. Step names end with the direction law.\n",
           "| model | mode | step | temp MiB | argument MiB | memory / inference | ms | "
           "time / (calls x inference) |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in results["steps"]:
    lines.append(f"| {r['model']} | {r['mode']} | {r['step']} | {r['temp_bytes'] / 2**20:.2f} | "
                 f"{r['argument_bytes'] / 2**20:.2f} | {r['memory_ratio']:.3f} | "
                 f"{r['seconds'] * 1e3:.2f} | {r['time_ratio']:.2f} |")
  if results["torch"]:
    lines += ["", "## PyTorch MeZO step on a twin model (same batch, CPU)", "",
              "| model | mode | step | ms | time / (2m torch inference) | ours spsa / torch | "
              "ours fused / torch |", "|---|---|---|---:|---:|---:|---:|"]
    for r in results["torch"]:
      lines.append(f"| {r['model']} | {r['mode']} | {r['step']} | {r['seconds'] * 1e3:.2f} | "
                   f"{r['time_ratio']:.2f} | {r['ours_spsa_over_torch']:.2f} | "
                   f"{r['ours_fused_over_torch']:.2f} |")
  if results["scaling"]:
    lines += ["", "## Perturbation-parallel step over virtual CPU devices", "",
              "| model | mode | m | devices | ms |", "|---|---|---:|---:|---:|"]
    for r in results["scaling"]:
      lines.append(f"| {r['model']} | {r['mode']} | {r['num_directions']} | {r['devices']} | "
                   f"{r['seconds'] * 1e3:.2f} |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  ints = lambda s: [int(v) for v in s.split(",") if v]
  names = lambda s: [v for v in s.split(",") if v]
  blocks = lambda s: [None if v == "none" else int(v) for v in s.split(",") if v]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", type=names, default=["mlp", "conv4"])
  parser.add_argument("--modes", type=names, default=["ft", "lp"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--precision", default="float")
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--directions", type=ints, default=[1, 3])
  parser.add_argument("--distributions", type=names, default=["irwin_hall", "fast_gaussian"],
                      help="names of fwdgrad.estimators.DISTRIBUTIONS, or packed_rademacher")
  parser.add_argument("--block-size", type=blocks, default=[None],
                      help="fused step block sizes, 'none' for whole leaves")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--scaling", type=ints, default=[1, 2, 4, 8],
                      help="device counts for the perturbation-parallel step")
  parser.add_argument("--no-scaling", dest="scaling", action="store_const", const=[])
  parser.add_argument("--scaling-only", action="store_true",
                      help="only the perturbation-parallel scaling rows (skips the step table)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--memory-only", action="store_true",
                      help="compile and account memory only; no step is run or timed")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  parser.add_argument("--scaling-worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  flags = os.environ.get("XLA_FLAGS", "")
  if "ynn_fusion_type" not in flags and not (args.scaling_worker or args.memory_worker):
    # Before anything starts XLA's backend, which reads XLA_FLAGS once.
    os.environ["XLA_FLAGS"] = (flags + " " + TIME_XLA_FLAGS).strip()
  if args.scaling_worker:
    return scaling_worker(args)
  if args.memory_worker:
    print("RESULT " + json.dumps(measure_memory(args.models[0], args.modes[0], args)))
    return None
  results = dict(
      environment=(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}, "
                   f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                   f"batch {args.batch}, precision {args.precision}, warmup {args.warmup}, "
                   f"repeats {args.repeats}, timed with "
                   f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}"),
      steps=[], torch=[], scaling=[])
  if args.scaling_only and not args.scaling:
    raise SystemExit("--scaling-only needs device counts: drop --no-scaling or pass --scaling.")
  for name in args.models:
    for mode in ([] if args.scaling_only else args.modes):
      rows = measure(name, mode, args)
      results["steps"] += rows
      if not args.no_torch and not args.memory_only:
        results["torch"] += torch_rows(name, mode, args, rows)
    if args.scaling:
      results["scaling"] += scaling_rows(name, "ft", args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown(results))
  print(f"wrote {args.out}/results.json and results.md")


if __name__ == "__main__":
  main()
