r"""What each backbone's integer forward costs on the edge runtime (IREE), against JAX.

For Conv4, ResNet12, the GRU CRNN and the speech embedding at 16w8a (random weights with random
BatchNorm statistics, calibrated on random inputs: sizes and times do not depend on the values),
at the input sizes of the experiments and a 5-way 5-shot support batch of 25, it compiles one
direction's two forward calls of QZO-FF with the head trained (LP): the integer features of the
batch and the cross-entropy of the two perturbed heads, which are the module's inputs
(``fwdgrad.edge.integer``). It reports

* the compiled module's bytes for IREE's CPU (``llvm-cpu``) and ``vmvx`` backends, and the
  compile time;
* the median time of one call (after a warm-up call) on IREE and on XLA:CPU (the same integer
  function under ``jax.jit``), and of the two perturbed calls of the float fake-quant simulation
  the library trains with (``model.apply`` at 16w8a, jitted);
* XLA's memory analysis of the integer call (IREE's Python runtime reports no peak memory);
* the bytes of the integer weights (inference), what QZO-FF keeps beyond them between steps (the
  key, the step count, and ε_q, M_u, k_u per trained leaf) and the buffers of a step as
  ``fwdgrad.edge.runner`` holds them (both perturbed heads and m = 3 directions).

Run from the repository root (needs the ``edge`` extra)::

  python benchmarks/edge.py --out benchmarks/results/edge

Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fwdgrad import models
from fwdgrad.edge import integer
from fwdgrad.edge import runtime

# name: (model kwargs, one example's shape); the experiments' sizes.
BACKBONES = {
    "conv4": (dict(features=(32, 32, 32, 32)), (28, 28, 1)),     # fewshot_vision
    "resnet12": ({}, (28, 28, 1)),                               # Omniglot-sized ResNet12
    "crnn": ({}, (76, 32)),                                      # fewshot_audio
    "speech_embedding": ({}, (76, 32)),                          # fewshot_audio:embedding
}
WAYS, BATCH, DIRECTIONS = 5, 25, 3


def calibrated(name: str, precision: str = "16w8a"):
  kwargs, shape = BACKBONES[name]
  model = models.get_model(name, num_classes=WAYS, precision=precision, **kwargs)
  x = jax.random.normal(jax.random.key(0), (BATCH, *shape))
  variables = dict(model.init(jax.random.key(1), x[:1]))
  rng = np.random.default_rng(0)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32),
        variables["batch_stats"])
  return model, models.calibrate(model, variables, x), np.asarray(x)


def _median_ms(fn, repeats: int) -> float:
  fn()  # Warm-up (and compilation, for jax.jit).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def measure(name: str, backends, repeats: int) -> dict:
  model, variables, x = calibrated(name)
  program = integer.program(model, variables)
  x_q = integer.quantize_inputs(program, x)
  labels = np.arange(BATCH, dtype=np.int32) % WAYS
  head = integer.head_codes(program, variables["params"]["head"])
  b, w = head["bias"], head["kernel"]

  def losses(x_q, labels, b_plus, w_plus, b_minus, w_minus):
    # (Also the integer logits of w+, which must equal XLA's bit for bit; the losses are float.)
    f = integer.features(program, x_q)
    return (integer.loss(program, f, labels, {"bias": b_plus, "kernel": w_plus}),
            integer.loss(program, f, labels, {"bias": b_minus, "kernel": w_minus}),
            integer.logits(program, f, {"bias": b_plus, "kernel": w_plus}))

  args = [x_q, labels, b, w, b, w]
  jitted = jax.jit(losses)
  memory = jitted.lower(*args).compile().memory_analysis()

  def simulation():
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply(dict(variables, params=p), x))[
        jnp.arange(BATCH), labels])
    return jax.jit(lambda p: (loss(p), loss(p)))

  sim = simulation()
  params = variables["params"]
  row = dict(
      parameters=int(sum(np.size(v) for v in jax.tree.leaves(params))),
      weight_bytes=integer.weight_bytes(program) + int(b.nbytes + w.nbytes),
      head_bytes=int(b.nbytes + w.nbytes),
      state_bytes=8 + 4 + 3 * 4 * 2,
      step_buffer_bytes=int(2 * (b.nbytes + w.nbytes) + DIRECTIONS * (b.size + w.size)),
      xla_temp_bytes=int(memory.temp_size_in_bytes),
      jax_integer_ms=_median_ms(lambda: jitted(*args), repeats),
      jax_simulation_ms=_median_ms(lambda: sim(params), repeats),
      backends={})
  want = [np.asarray(v) for v in jitted(*args)]
  for backend in backends:
    module = runtime.compile_function(losses, args, backend)
    got = module(*args)
    row["backends"][backend] = dict(
        module_bytes=module.size, compile_seconds=module.compile_seconds,
        call_ms=_median_ms(lambda: module(*args), repeats if backend == "llvm-cpu" else 1),
        logits_equal_jax=bool(np.array_equal(got[2], want[2])),
        loss_difference=float(max(abs(float(g) - float(v)) for g, v in zip(got[:2], want[:2]))))
    print(f"{name} {backend}: {row['backends'][backend]}", flush=True)
  return row


def markdown(results: dict) -> str:
  lines = ["| backbone | params | integer weights (bytes) | module bytes llvm-cpu / vmvx | "
           "compile s | one direction, ms: IREE llvm-cpu / vmvx / XLA integer / XLA simulation | "
           "XLA temp bytes | logit codes = XLA |", "|---|---|---|---|---|---|---|---|"]
  for name, row in results.items():
    be = row["backends"]
    get = lambda b, k, fmt: fmt.format(be[b][k]) if b in be else "-"
    lines.append(
        f"| {name} | {row['parameters']:,} | {row['weight_bytes']:,} | "
        f"{get('llvm-cpu', 'module_bytes', '{:,}')} / {get('vmvx', 'module_bytes', '{:,}')} | "
        f"{get('llvm-cpu', 'compile_seconds', '{:.1f}')} / "
        f"{get('vmvx', 'compile_seconds', '{:.1f}')} | "
        f"{get('llvm-cpu', 'call_ms', '{:.1f}')} / {get('vmvx', 'call_ms', '{:.0f}')} / "
        f"{row['jax_integer_ms']:.1f} / {row['jax_simulation_ms']:.1f} | "
        f"{row['xla_temp_bytes']:,} | "
        f"{'yes' if all(b['logits_equal_jax'] for b in be.values()) else 'NO'} |")
  some = next(iter(results.values()))
  lines += ["", f"Beyond inference, QZO-FF keeps {some['state_bytes']} bytes between steps (key, "
            "step count, ε_q, M_u, k_u for the head's two leaves); the runner's step buffers "
            "(both perturbed heads, 3 directions) are "
            + ", ".join(f"{n} {r['step_buffer_bytes']:,}" for n, r in results.items())
            + " bytes."]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(BACKBONES))
  parser.add_argument("--backends", default=",".join(runtime.BACKENDS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/edge")
  args = parser.parse_args()
  results = {name: measure(name, args.backends.split(","), args.repeats)
             for name in args.models.split(",")}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = markdown(results)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
