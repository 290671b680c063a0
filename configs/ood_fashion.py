"""OOD on Fashion-MNIST (the paper's CIFAR-10 → CIFAR-10-C at 28×28): clean → corrupted, LP-1.

  python train.py --config configs/ood_fashion.py --workdir workdirs/ood_fashion

A Conv4 is pre-trained with backprop on the clean Fashion-MNIST training split (60k images, from
the Debian package ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``, or
``--config.data.kwargs.path`` and ``--config.pretrain.data.kwargs.path``); the 10k test split is
corrupted (``config.data.corruption``, ``config.data.severity``; CIFAR-10-C's families adapted to
28×28 grayscale in ``fwdgrad.data.corruptions``) and split 90 / 10 per seed: each method re-trains
the pre-trained classifier (LP-1 from the pre-trained head) on the 90% and is scored on the 10%.
Zero-shot is the pre-trained classifier on the corrupted 10%. ``get_config("tiny")`` is the same
pipeline at test size.
"""

from fwdgrad import experiment

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def get_config(arg=None):
  experiment.config_variant(arg, ("tiny",), "configs/ood_fashion.py")
  config = experiment.default_config()
  config.data.source = "idx"
  config.data.kwargs = dict(path=FASHION_MNIST, split="test")
  config.data.corruption = "contrast"
  config.data.severity = 5
  config.pretrain.data.source = "idx"
  config.pretrain.data.kwargs = dict(path=FASHION_MNIST, split="train")
  config.model.name = "conv4"
  config.model.kwargs = dict(features=(32, 64, 64))
  config.pretrain.steps = 1500
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 3e-3
  config.pretrain.log_every = 100
  config.pretrain.checkpoint_every = 500
  config.pretrain.val_fraction = 0.05
  config.pretrain.min_val_accuracy = 0.85
  config.task.kind = "transfer"
  config.task.test_fraction = 0.1
  config.task.train_examples = 2000
  config.task.num_tasks = 3
  config.adapt.mode = "lp"
  config.adapt.head = "pretrained"
  config.adapt.steps = 600
  config.adapt.batch_size = 128
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      zero_shot_16w8a=experiment.method("zero_shot", precision="16w8a"),
      backprop=experiment.method("backprop", learning_rate=3e-3, optimizer="adam", steps=100),
      ff=experiment.method("ff", learning_rate=3e-3, num_directions=3, optimizer="sgd"),
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=3e-3,
                                     num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=3e-3,
                                    num_directions=3),
  )
  if arg == "tiny":
    experiment.shrink_for_tests(config)
    config.data.max_examples = 400
    config.pretrain.data.max_examples = 400
    config.model.kwargs = dict(features=(8, 8))
    config.pretrain.min_val_accuracy = 0.0
    config.task.train_examples = 40
    for method in config.methods.values():
      method.steps = -1
  return config
