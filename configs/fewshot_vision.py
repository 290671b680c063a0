"""Vision few-shot (the paper's Table 1 setting): 5-way 5-shot, ProtoNets head, 100 test tasks.

  FWDGRAD_DATA_DIR=/path/to/data python train.py --config configs/fewshot_vision.py \
      --workdir workdirs/fewshot_vision

Offline default: Omniglot ("background small 1", 28x28, alphabet/character/*.png, zipped) at
``$FWDGRAD_DATA_DIR/omniglot/images_background_small1.zip``; a Conv4 backbone is pre-trained with
backprop on 60% of the characters and adapted to episodes drawn from the other 40%.

The paper's datasets, for users who have them (override on the command line):
  CIFAR-FS (CIFAR-100 few-shot split, 32x32):  --config.data.source=tfds:cifar100
      --config.data.kwargs="{'data_dir': '/path/to/tensorflow_datasets'}"
  CUB / miniImageNet / tieredImageNet (84x84):  --config.data.source=image_folder
      --config.data.kwargs="{'path': '/path/to/images', 'image_size': 84, 'channels': 3}"
      --config.model.name=resnet12   (or resnet18 / vit_tiny with model.kwargs.image_size=84)
Variants: ``get_config("lp")`` trains an LP-1 head instead of the whole backbone;
``get_config("tiny")`` is the pipeline at a size for tests.
"""

from fwdgrad import experiment


def get_config(arg=None):
  experiment.config_variant(arg, ("lp", "tiny"), "configs/fewshot_vision.py")
  config = experiment.default_config()
  config.data.source = "omniglot"
  config.data.kwargs = dict(path=experiment.data_dir("omniglot", "images_background_small1.zip"))
  config.model.name = "conv4"
  config.pretrain.steps = 1000
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 3e-3
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 200
  config.task.split_sizes = (0.6, 0.0, 0.4)
  config.task.ways = 5
  config.task.shots = 5
  config.task.queries = 15
  config.task.num_tasks = 100
  config.adapt.mode = "ft"
  config.adapt.head = "protonet"
  config.adapt.steps = 30
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      # What fixed-point inference alone costs: the same ProtoNets classifier, backbone at 16w8a.
      zero_shot_16w8a=experiment.method("zero_shot", precision="16w8a"),
      backprop=experiment.method("backprop", learning_rate=1e-3, optimizer="adam"),
      ff=experiment.method("ff", learning_rate=1e-2, num_directions=3, optimizer="sgd"),
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-3, num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=1e-3, num_directions=3),
  )
  if arg == "lp":
    config.adapt.mode = "lp"
    config.adapt.head = "linear"
  if arg == "tiny":
    experiment.shrink_for_tests(config)
    config.model.kwargs = dict(features=(8, 8, 8, 8))
  return config
