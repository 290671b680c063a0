"""Adapt a pre-trained model on an inference-only runtime (IREE) and print what it cost.

  python -m fwdgrad.edge --workdir workdirs/edge

Pre-trains (or loads from ``<workdir>/backbone``) the quickstart's Conv4, calibrates it at the
method's precision on the task's training inputs, converts it to integer constants, compiles the
integer forward with IREE for each backend, and adapts the head with QZO-FF driven by the compiled
modules, with the integer update in numpy. The same run through ``fwdgrad.qzo_ff`` in JAX is the
reference the engine's integer weights must equal. Writes ``results.json``, ``results.md``, the
compiled modules (``<backend>/*.vmfb``) and the adapted head codes (``<backend>/head_q.npz``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise SystemExit(f"--config: no file {path!r}; run from the repository root or give the path "
                     "of configs/quickstart.py.")
  spec = importlib.util.spec_from_file_location("edge_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _accuracy(logit_codes, labels) -> float:
  return float(np.mean(np.argmax(logit_codes, -1) == np.asarray(labels)))


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import fwdgrad  # pylint: disable=g-import-not-at-top
  from fwdgrad import experiment, models, qzo, train_lib  # pylint: disable=g-import-not-at-top
  from fwdgrad.edge import integer, runner  # pylint: disable=g-import-not-at-top

  config = _load_config(args.config)
  config.progress = False
  config = experiment.validate_config(config)
  if config.model.name != "conv4" or config.adapt.mode != "lp":
    raise SystemExit(f"the integer forward covers Conv4 with LP (the quickstart); {args.config} "
                     f"has model {config.model.name!r}, mode {config.adapt.mode!r}.")
  if args.method not in config.methods or config.methods[args.method].kind != "qzo_ff":
    raise SystemExit(f"--method: {args.method!r} is not a qzo_ff method of {args.config} "
                     f"(those are {[k for k, v in config.methods.items() if v.kind == 'qzo_ff']}).")
  method = config.methods[args.method]
  steps = args.steps or (method.steps if method.steps > 0 else config.adapt.steps)
  os.makedirs(args.workdir, exist_ok=True)
  splits = train_lib.make_splits(config)
  backbone = train_lib.pretrain(config, splits, args.workdir)
  task = train_lib.make_task(config, splits, args.task)
  head = {k: jnp.asarray(v) for k, v in backbone["head"]["params"].items()}
  model = models.get_model("conv4", num_classes=head["kernel"].shape[-1],
                           precision=method.precision, **config.model.kwargs.to_dict())
  params = dict(backbone["params"], head=head)
  variables = models.calibrate(model, {"params": params, "batch_stats": backbone["batch_stats"]},
                               jnp.asarray(task.support_inputs[:config.adapt.calibration_examples]))
  bits = models.Precision.parse(method.precision).weight_bits
  tx = fwdgrad.qzo_ff(method.learning_rate, key=0, weight_bits=bits, epsilon=method.epsilon,
                      num_directions=method.num_directions,
                      weight_scale=models.weight_scales(variables)["head"])
  state = tx.init(head)
  constants = runner.update_constants(state, method.learning_rate, bits)
  program = integer.conv4_program(model, variables)
  head_q = {k: np.asarray(v) for k, v in qzo.qzo_integer_weights(head, state, bits).items()}
  x_train = integer.quantize_inputs(program, task.support_inputs)
  x_test = integer.quantize_inputs(program, task.query_inputs)
  y_train = np.asarray(task.support_labels, np.int32)
  features = jax.jit(lambda x: integer.features(program, x))
  f_train, f_test = np.asarray(features(x_train)), np.asarray(features(x_test))
  logits = jax.jit(lambda f, h: integer.logits(program, f, h))
  seed = config.seed * 1000 + args.task
  key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))

  start = time.perf_counter()
  jax_w, jax_losses, jax_step = runner.jax_reference(
      program, head_q, constants.weight_scale, method.learning_rate, seed,
      method.num_directions, method.epsilon, f_train, y_train, steps, bits)
  print(f"JAX: {steps} QZO-FF steps in {time.perf_counter() - start:.1f} s", flush=True)
  rows = {"jax": dict(step_ms=1e3 * jax_step,
                      accuracy_before=_accuracy(logits(f_test, head_q), task.query_labels),
                      accuracy_after=_accuracy(logits(f_test, jax_w), task.query_labels),
                      loss_first=jax_losses[0], loss_last=jax_losses[-1])}
  agreement = integer.simulation_agreement(model, variables, program, task.query_inputs)
  batch = args.eval_batch
  for backend in args.backends:
    out = os.path.join(args.workdir, backend)
    os.makedirs(out, exist_ok=True)
    modules = runner.compile_modules(program, head_q, x_train.shape[1:], x_train.shape[0], batch,
                                     method.num_directions, constants.fmt, backend)
    for name in modules._fields:
      with open(os.path.join(out, f"{name}.vmfb"), "wb") as f:
        f.write(getattr(modules, name).vmfb)
    e_train = runner.batched(modules.features, x_train, batch)
    e_test = runner.batched(modules.features, x_test, batch)
    before = runner.batched(modules.logits, e_test, batch, head_q["bias"], head_q["kernel"])
    w_q, times, losses = dict(head_q), [], []
    start = time.perf_counter()
    for t in range(steps):
      w_q, loss = runner.engine_step(modules, w_q, constants, key_data, t, e_train, y_train,
                                     times)
      losses.append(loss)
    seconds = time.perf_counter() - start
    after = runner.batched(modules.logits, e_test, batch, w_q["bias"], w_q["kernel"])
    np.savez(os.path.join(out, "head_q.npz"), **w_q)
    step = np.median([sum(t) for t in times[1:]]) if len(times) > 1 else seconds
    rows[backend] = dict(
        module_bytes={name: getattr(modules, name).size for name in modules._fields},
        compile_seconds=sum(getattr(modules, name).compile_seconds for name in modules._fields),
        step_ms=1e3 * float(step), forward_ms=1e3 * float(np.median([t.forward for t in times])),
        update_ms=1e3 * float(np.median([t.update for t in times])),
        features_equal_jax=bool(np.array_equal(e_train, f_train) and
                                np.array_equal(e_test, f_test)),
        weights_equal_jax=all(np.array_equal(w_q[k], jax_w[k]) for k in w_q),
        accuracy_before=_accuracy(before, task.query_labels),
        accuracy_after=_accuracy(after, task.query_labels),
        loss_first=losses[0], loss_last=losses[-1])
    print(f"{backend}: {steps} steps in {seconds:.1f} s, integer weights equal to JAX: "
          f"{rows[backend]['weights_equal_jax']}", flush=True)
  params_count = sum(int(np.size(v)) for v in head_q.values())
  weight_bytes = sum(int(np.asarray(v).nbytes) for v in head_q.values())
  backbone_bytes = sum(int(np.asarray(k).nbytes) for k in program.kernels)
  m = method.num_directions
  memory = dict(
      inference_weight_bytes=backbone_bytes + weight_bytes,
      # Kept between steps: the key, the step count, and ε_q, M_u, k_u per trained leaf (int32).
      training_state_bytes=8 + 4 + 3 * 4 * len(head_q),
      # Within a step, as this runner holds them: both perturbed heads and the m directions.
      runner_step_bytes=2 * weight_bytes + m * params_count)
  result = dict(config=args.config, method=args.method, precision=method.precision, steps=steps,
                learning_rate=method.learning_rate, epsilon=method.epsilon, num_directions=m,
                train_examples=int(x_train.shape[0]), test_examples=int(x_test.shape[0]),
                simulation_agreement=agreement, memory=memory, rows=rows)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = markdown(result)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return result


def markdown(result: dict) -> str:
  """The run's table (``results.md``)."""
  lines = [f"QZO-FF {result['precision']} on {result['config']} (LP, {result['steps']} steps, "
           f"m = {result['num_directions']}, η = {result['learning_rate']:g}, "
           f"ε = {result['epsilon']:g}; {result['train_examples']} training, "
           f"{result['test_examples']} test examples)", "",
           "| runtime | module bytes (features / losses / logits / directions) | compile s | "
           "step ms | test acc. before → after % | integer weights = JAX |",
           "|---|---|---|---|---|---|"]
  for name, row in result["rows"].items():
    sizes = " / ".join(str(v) for v in row["module_bytes"].values()) if "module_bytes" in row else "-"
    compile_s = f"{row['compile_seconds']:.1f}" if "compile_seconds" in row else "-"
    same = ("yes" if row["weights_equal_jax"] else "NO") if "weights_equal_jax" in row else "-"
    label = "JAX (XLA:CPU), qzo_ff" if name == "jax" else f"IREE {name}"
    lines.append(f"| {label} | {sizes} | {compile_s} | {row['step_ms']:.2f} | "
                 f"{100 * row['accuracy_before']:.1f} → {100 * row['accuracy_after']:.1f} | "
                 f"{same} |")
  memory, agreement = result["memory"], result["simulation_agreement"]
  lines += ["", f"Inference weights: {memory['inference_weight_bytes']} bytes; what training keeps "
            f"beyond them: {memory['training_state_bytes']} bytes (key, step, ε_q, M_u, k_u); "
            f"this runner's per-step buffers: {memory['runner_step_bytes']} bytes (w±, z_q).",
            f"Float simulation vs this integer forward: {100 * agreement['equal']:.2f}% of test "
            f"logit codes equal, at most {agreement['max_difference']} code apart."]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m fwdgrad.edge",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/quickstart.py",
                      help="a config file, optionally with ':<variant>' (as train.py takes it)")
  parser.add_argument("--workdir", default="workdirs/edge")
  parser.add_argument("--method", default="qzo_ff_16w8a", help="a qzo_ff method of the config")
  parser.add_argument("--steps", type=int, default=0, help="0: the method's step count")
  parser.add_argument("--task", type=int, default=0)
  parser.add_argument("--eval_batch", type=int, default=100)
  parser.add_argument("--backends", nargs="+", default=["llvm-cpu", "vmvx"])
  args = parser.parse_args(argv)
  from fwdgrad.edge import runtime  # pylint: disable=g-import-not-at-top
  for backend in args.backends:
    if backend not in runtime.BACKENDS:
      parser.error(f"--backends: unknown IREE backend {backend!r}; expected {runtime.BACKENDS}.")
  run(args)


if __name__ == "__main__":
  sys.exit(main())
