"""Cross-domain adaptation (the paper's ViT → Visual Wake Words): a new binary decoder on a
pre-trained ViT, by linear probing (LP) or deep visual prompt tuning (D-VPT).

  python train.py --config configs/cross_domain.py --workdir workdirs/cross_domain

Offline default: a small ViT is pre-trained with backprop on clean Fashion-MNIST (clothing; the
60k training split of Debian's ``dataset-fashion-mnist``, ``/usr/share/datasets/fashion-mnist``)
and adapted to a binary task in another domain: scikit-learn's handwritten digits, resized to
28x28, "5-9 vs 0-4". The decoder is new and randomly initialised (zero-shot: that random decoder,
about 50%). A fixed 30% of the digits (the same for every seed) is set aside for tuning; each seed
splits the rest 80 / 20, and each of its 5 tasks trains on 1,000 of the 80% with its own decoder
initialisation, training subset and directions, and is scored on the 20%.

The paper's setting: Visual Wake Words laid out as ``person/`` and ``no_person/`` image folders
(``--config.data.source=image_folder --config.data.kwargs="{'path': '/path/to/vww',
'image_size': 224, 'channels': 3}" --config.data.positive_classes="('person',)"``), ViT-tiny
(``--config.model.name=vit_tiny --config.model.kwargs="{'num_prompts': 10}"``) pre-trained on
ImageNet. Variants (joined by ``_``): ``dvpt`` trains prompts plus the decoder; ``tiny`` is the
pipeline at a size for tests. Learning rates come from
``--config.task.tune=True`` runs over ``config.tune_grid`` (docs/RESULTS.md has the tables).
"""

from fwdgrad import experiment

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MAIN = ("zero_shot", "backprop", "ff", "qzo_ff_16w8a", "qzo_ff_8w8a")


def get_config(arg=None):
  variants = experiment.config_variant(arg, ("dvpt", "tiny"), "configs/cross_domain.py",
                                       combinable=True)
  config = experiment.default_config()
  config.data.source = "digits"
  config.data.kwargs = dict(image_size=28)
  config.data.positive_classes = ("5", "6", "7", "8", "9")
  config.pretrain.data.source = "idx"
  config.pretrain.data.kwargs = dict(path=FASHION_MNIST, split="train")
  config.model.name = "vit_tiny"
  config.model.kwargs = dict(image_size=28, patch_size=4, width=64, depth=4, num_heads=2,
                             mlp_features=128, num_prompts=4)
  config.pretrain.steps = 1500
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 1e-3
  config.pretrain.log_every = 100
  config.pretrain.checkpoint_every = 500
  config.pretrain.val_fraction = 0.05
  config.pretrain.min_val_accuracy = 0.8
  config.task.kind = "transfer"
  config.task.tuning_fraction = 0.3
  config.task.test_fraction = 0.2
  config.task.train_examples = 1000
  config.task.num_tasks = 5
  config.adapt.mode = "lp"
  config.adapt.head = "random"
  config.adapt.steps = 6000
  config.adapt.batch_size = 100
  # The best point of each method's row of config.tune_grid (a config.task.tune run).
  config.methods = experiment.paper_methods(
      learning_rate=3e-3, backprop_learning_rate=3e-2, backprop_steps=1000,
      kernelwise_learning_rate=1e-2, zero_shot_16w8a=None,
      ff=dict(learning_rate=3e-2), spsa=dict(learning_rate=3e-2),
      qzo_ff_16w8a=dict(learning_rate=1e-2, head_range=4.0),
      qzo_ff_8w8a=dict(learning_rate=3e-3, epsilon=4e-3))
  lrs = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  steps = (600, 2000, 6000)
  config.tune_grid = dict(
      backprop=dict(learning_rate=(1e-3, 3e-3, 1e-2, 3e-2), steps=(100, 300, 1000)),
      ff=dict(learning_rate=lrs, steps=steps),
      spsa=dict(learning_rate=lrs, steps=steps),
      qzo_ff_16w8a=dict(learning_rate=lrs, steps=steps, head_range=(1.0, 4.0)),
      qzo_ff_16w8a_m1=dict(learning_rate=lrs, steps=steps[1:]),
      qzo_ff_8w8a=dict(learning_rate=lrs, epsilon=(1e-3, 4e-3), steps=steps[1:],
                       head_range=(1.0, 4.0)),
      qzo_ff_16w8a_momentum=dict(learning_rate=lrs, steps=steps[1:]),
      qzo_ff_16w8a_sharpness=dict(learning_rate=lrs, steps=steps[1:]),
      qzo_ff_16w8a_kernelwise=dict(learning_rate=(1e-2, 3e-2, 1e-1), steps=steps[1:]),
      qzo_ff_16w8a_sharpness_kernelwise=dict(learning_rate=(1e-2, 3e-2, 1e-1),
                                             steps=steps[1:]),
  )
  if "dvpt" in variants:
    config.adapt.mode = "dvpt"
    config.adapt.steps = 600
    config.task.num_tasks = 3
    config.methods["backprop"].steps = 100
  if "dvpt" in variants or "tiny" in variants:  # (The tests run the rest in other configs.)
    config.methods = {name: config.methods[name] for name in MAIN}
    config.tune_grid = {name: grid for name, grid in config.tune_grid.items() if name in MAIN}
  if "dvpt" in variants:  # Each step runs the whole ViT: a smaller grid.
    config.tune_grid = {name: dict(learning_rate=(1e-3, 3e-3, 1e-2)) for name in MAIN[1:]}
  if "tiny" in variants:
    experiment.shrink_for_tests(config)
    config.pretrain.data.max_examples = 400
    config.pretrain.min_val_accuracy = 0.0
    config.task.train_examples = 100
    config.model.kwargs = dict(image_size=28, patch_size=7, width=16, depth=1, num_heads=2,
                               mlp_features=32, num_prompts=2)
    config.tune_grid = {name: {field: values[:2] for field, values in grid.items()}
                        for name, grid in config.tune_grid.items()}
    for method in config.methods.values():
      method.steps = -1
  return config
