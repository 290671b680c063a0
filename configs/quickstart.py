"""Quickstart: few-shot adaptation on the embedded scikit-learn digits, every method in one table.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart

Pre-trains a small convolutional backbone with backprop on 3 of the 10 digit classes, then adapts it
to 5-way 5-shot tasks on the other 7 with a ProtoNets head, comparing zero-shot, backprop, the
forward gradient (jvp), and the paper's integer QZO-FF at 16w8a and 8w8a. No download, CPU only.
``get_config("tiny")`` is the same pipeline at a size for tests.
"""

from fwdgrad import experiment


def get_config(arg=None):
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
  config.task.shots = 5
  config.task.queries = 15
  config.task.num_tasks = 20
  config.adapt.mode = "ft"
  config.adapt.head = "protonet"
  config.adapt.steps = 30
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      backprop=experiment.method("backprop", learning_rate=1e-3, optimizer="adam"),
      ff=experiment.method("ff", learning_rate=1e-2, num_directions=3, optimizer="sgd"),
      # The same η for both bit widths: with 8-bit weights ε rounds to zero for most tensors.
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-2,
                                     num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=1e-2,
                                    num_directions=3),
  )
  if arg == "tiny":
    experiment.shrink_for_tests(config)
    config.model.kwargs = dict(features=(8, 8))
  return config
