"""Does QZO-FF's fixed weight range hold a randomly initialised decoder back? A measurement.

  python scripts/weight_range.py --backbone workdirs/cross_domain_s0/backbone

QZO-FF keeps ``Δ_w`` from ``init`` (the paper's fixed-scale scheme), so no weight can pass its
leaf's initial range ``w_max``. A pre-trained head starts at the scale it needs; a random decoder
(``configs/cross_domain.py``) may need larger weights. On the cross-domain tuning split (the data
no reported run sees), with float features of the pre-trained ViT and the same random decoder, this
trains the decoder by float sign-m-SPSA with weights clipped to the initial range and not, and by
QZO-FF 16-bit with the initial range and with a wider one (``weight_scale`` × ``--range``), and
prints the validation accuracy and the fraction of the kernel at the edge of its range.
"""

import argparse
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="workdirs/cross_domain_s0/backbone")
  parser.add_argument("--steps", type=int, default=6000)
  parser.add_argument("--learning_rate", type=float, default=3e-2)
  parser.add_argument("--range", type=float, default=4.0)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import fwdgrad  # pylint: disable=g-import-not-at-top
  from fwdgrad import adaptation, experiment, models, train_lib  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("cd", os.path.join(REPO, "configs",
                                                                   "cross_domain.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.task.tune = True
  config.pretrain.init_checkpoint = args.backbone
  config = experiment.validate_config(config)
  splits = train_lib.make_splits(config)
  variables = train_lib.load_backbone(args.backbone)
  adapter = adaptation.Adapter(config.model.name, config.model.kwargs.to_dict(), variables,
                               config.methods.zero_shot, config.adapt, 2, 0)
  xs = adapter.features(variables["params"], jnp.asarray(splits.adapt.inputs))
  ys = jnp.asarray(splits.adapt.labels)
  xq = adapter.features(variables["params"], jnp.asarray(splits.adapt_test.inputs))
  yq = np.asarray(splits.adapt_test.labels)
  dense = models.QDense(2, precision="float")

  def loss(params, x, y):
    logits = dense.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def accuracy(params):
    return float(np.mean(np.argmax(np.asarray(dense.apply({"params": params}, xq)), -1) == yq))

  def run(tx, params, clip=None, key=0):
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
      index = jax.random.choice(jax.random.fold_in(jax.random.key(key), i), xs.shape[0],
                                (config.adapt.batch_size,), replace=False)
      updates, state = tx.update(params, state, params,
                                 value_fn=lambda p: loss(p, xs[index], ys[index]))
      params = optax.apply_updates(params, updates)
      if clip is not None:
        params = jax.tree_util.tree_map(jnp.clip, params, jax.tree_util.tree_map(jnp.negative,
                                                                                 clip), clip)
      return params, state

    for i in range(args.steps):
      params, state = step(params, state, i)
    return params

  rows = {}
  for seed in args.seeds:
    params = dense.init(jax.random.key(seed), xs[:1])["params"]
    w_max = jax.tree_util.tree_map(lambda w: jnp.max(jnp.abs(w)), params)
    # A zero bias gets its layer's range, as qzo_ff does.
    w_max["bias"] = jnp.maximum(w_max["bias"], w_max["kernel"])
    sign_spsa = fwdgrad.forward_gradient(key=seed, num_directions=3, estimator="spsa",
                                         sign=True)
    sgd = lambda: optax.chain(sign_spsa, optax.sgd(args.learning_rate))
    scale = jax.tree_util.tree_map(lambda w: w / 32767, w_max)
    wide = jax.tree_util.tree_map(lambda s: s * args.range, scale)
    variants = {
        "float sign-SPSA": (sgd(), None),
        "float sign-SPSA, clipped to the initial range": (sgd(), w_max),
        "QZO-FF 16-bit, initial range": (fwdgrad.qzo_ff(args.learning_rate, key=seed,
                                                        weight_scale=scale), None),
        f"QZO-FF 16-bit, range x{args.range:g}": (fwdgrad.qzo_ff(args.learning_rate, key=seed,
                                                                 weight_scale=wide), None),
    }
    for name, (tx, clip) in variants.items():
      final = run(tx, params, clip, key=seed)
      edge = float(jnp.mean(jnp.abs(final["kernel"]) >= 0.999 * w_max["kernel"]))
      rows.setdefault(name, []).append((accuracy(final), edge))
  print(f"| decoder training ({args.steps} steps, η = {args.learning_rate:g}, m = 3) | "
        "validation accuracy % | kernel entries at or beyond the initial w_max |")
  print("|---|---|---|")
  for name, values in rows.items():
    acc = np.mean([v[0] for v in values])
    edge = np.mean([v[1] for v in values])
    print(f"| {name} | {100 * acc:.2f} ({' / '.join(f'{100 * v[0]:.1f}' for v in values)}) | "
          f"{100 * edge:.0f}% |")


if __name__ == "__main__":
  main()
