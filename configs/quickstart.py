"""Quickstart: adapt a pre-trained classifier to blurred digits, every method in one table.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart

The paper's OOD setting at the size of the embedded scikit-learn digits (no download, CPU only): a
small Conv4 is pre-trained with backprop on a clean half of the 1,797 digits; the other half is
blurred (``gaussian_blur``, severity 3: CIFAR-10-C's σ = 0.7 px), which costs the pre-trained
classifier about a third of its accuracy. Each method then re-trains the classifier (LP-1 from the
pre-trained head) on 300 blurred examples and is scored on 449 blurred examples it never saw:
zero-shot (the pre-trained classifier as it is), backprop, the forward gradient (jvp), and the
paper's integer QZO-FF at 16w8a and 8w8a. The 5 tasks draw different training subsets, head
keys and directions.

Learning rates were chosen on a validation split (a third of seed 0's adaptation-training half,
disjoint from the scored examples; 2 keys per point), from the grid {1e-3, 3e-3, 1e-2} for
backprop (Adam, 100 steps), {3e-3, 1e-2, 3e-2} for FF (SGD, 600 steps) and for QZO-FF η (600
steps, at each bit width); docs/RESULTS.md gives the validation accuracies. Forward gradients get
6x backprop's steps. ``get_config("tiny")`` is the same pipeline at a size for tests.
"""

from fwdgrad import experiment


def get_config(arg=None):
  experiment.config_variant(arg, ("tiny",), "configs/quickstart.py")
  config = experiment.default_config()
  config.data.source = "digits"
  config.data.corruption = "gaussian_blur"
  config.data.severity = 3
  config.model.name = "conv4"
  config.model.kwargs = dict(features=(32, 64))
  config.pretrain.steps = 150
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 3e-3
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 50
  config.pretrain.min_val_accuracy = 0.95  # 98-99% on the clean validation digits
  config.task.kind = "transfer"
  config.task.pretrain_fraction = 0.5
  config.task.test_fraction = 0.5
  config.task.train_examples = 300
  config.task.num_tasks = 5
  config.adapt.mode = "lp"
  config.adapt.head = "pretrained"
  config.adapt.steps = 600
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      backprop=experiment.method("backprop", learning_rate=3e-3, optimizer="adam", steps=100),
      ff=experiment.method("ff", learning_rate=3e-3, num_directions=3, optimizer="sgd"),
      # One ε for both bit widths, half the paper's 1e-3: the 16-bit grid resolves it (ε/Δ_w is
      # in the hundreds), the 8-bit grid rounds it to ε_q = 0 (ε/Δ_w ~ 0.28; a FrozenLeafWarning
      # names the kernel) and only the bias moves: the paper's 8w8a failure. At ε = 1e-3,
      # ε/Δ_w is 0.55-0.59 on this head, rounds to one step, and 8w8a trains (docs/RESULTS.md).
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=3e-3,
                                     num_directions=3, epsilon=5e-4),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=3e-3,
                                    num_directions=3, epsilon=5e-4),
  )
  if arg == "tiny":
    experiment.shrink_for_tests(config)
    config.model.kwargs = dict(features=(8, 8))
    config.pretrain.min_val_accuracy = 0.0
    config.task.train_examples = 40
    for method in config.methods.values():
      method.steps = -1
  return config
