"""Loss landscapes of BP, FF, FF 16w8a and FF 8w8a on a real task, in LP and FT, side by side.

  python landscape.py --config configs/landscape.py --workdir workdirs/landscape

Pre-trains a small convolutional backbone with backprop on 3 of the 10 classes of scikit-learn's
bundled digits (no download, CPU only, a few minutes), takes one fixed 5-way 10-shot task on the
other 7 classes, and adapts it by backprop (SGD), the float sign-m-SPSA forward gradient (the
paper's FF), and the paper's integer QZO-FF with 16-bit and with 8-bit weights, each with the model
at the matching precision. LP trains a linear head on frozen features; FT trains the backbone and
the head. Each trajectory is drawn on the plane of its two principal components
(``workdir/landscape/lp.png``, ``ft.png``) and on one shared filter-normalized random plane
(``lp_random.png``, ``ft_random.png``); ``workdir/landscape/summary.json`` holds the numbers.
Override fields on the command line, e.g. ``--config.landscape.resolution=31``.
``get_config("tiny")`` is the same study at a size for tests.
"""

from fwdgrad import experiment
from fwdgrad import landscape_study


def get_config(arg=None):
  experiment.config_variant(arg, ("tiny",), "configs/landscape.py")
  config = experiment.default_config()
  config.data.source = "digits"
  config.model.name = "conv4"
  config.model.kwargs = dict(features=(32, 64))
  config.pretrain.steps = 200
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 3e-3
  config.pretrain.log_every = 25
  config.pretrain.checkpoint_every = 50
  config.task.split_sizes = (3, 0, 7)
  config.task.ways = 5
  config.task.shots = 10
  config.task.queries = 20
  config.task.num_tasks = 1
  config.adapt.head = "linear"
  config.adapt.steps = 100
  # One learning rate for the three forward-gradient runs, so that their steps compare directly.
  # jax.random.normal directions: the law the committed figure and table were made with.
  config.methods = dict(
      bp=experiment.method("backprop", learning_rate=0.1, optimizer="sgd"),
      ff=experiment.method("spsa", learning_rate=3e-3, num_directions=3, sign=True,
                           optimizer="sgd", distribution="gaussian"),
      ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=3e-3,
                                 num_directions=3, distribution="gaussian"),
      ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=3e-3,
                                num_directions=3, distribution="gaussian"),
  )
  config.landscape = landscape_study.landscape_defaults()
  # The probe's logits are divided by the feature width (256), so its gradients are small.
  config.landscape.overrides = dict(lp=dict(
      bp=dict(learning_rate=30.0), ff=dict(learning_rate=0.1),
      ff_16w8a=dict(learning_rate=0.1), ff_8w8a=dict(learning_rate=0.1)))
  if arg == "tiny":
    experiment.shrink_for_tests(config)
    config.model.kwargs = dict(features=(8, 8))
    config.task.num_tasks = 1
    config.task.shots = 5
    config.adapt.steps = 6
    config.landscape.record_every = 2
    config.landscape.resolution = 5
    config.landscape.random_plane = False
  return config
