"""Cross-domain adaptation (the paper's Visual Wake Words setting): a binary linear decoder on a
pre-trained ViT, by linear probing (LP) and deep visual prompt tuning (D-VPT), 5 seeds.

  FWDGRAD_DATA_DIR=/path/to/data python train.py --config configs/cross_domain.py \
      --workdir workdirs/cross_domain

Offline default: a small ViT is pre-trained on Omniglot characters (the source domain,
``$FWDGRAD_DATA_DIR/omniglot/images_background_small1.zip``) and adapted to a binary task in
another domain, Fashion-MNIST "footwear vs. the rest" (classes 5, 7, 9), read from the IDX files of
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).

The paper's setting: Visual Wake Words laid out as ``person/`` and ``no_person/`` image folders
(``--config.data.source=image_folder --config.data.kwargs="{'path': '/path/to/vww',
'image_size': 224, 'channels': 3}" --config.data.positive_classes="('person',)"``), ViT-tiny
(``--config.model.name=vit_tiny --config.model.kwargs="{'num_prompts': 10}"``) pre-trained on
ImageNet. ``get_config("dvpt")`` trains prompts plus the decoder; ``get_config("tiny")`` is the
pipeline at a size for tests.
"""

from fwdgrad import experiment

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def get_config(arg=None):
  experiment.config_variant(arg, ("dvpt", "tiny", "tiny_dvpt"), "configs/cross_domain.py")
  config = experiment.default_config()
  config.data.source = "idx"
  config.data.kwargs = dict(path=FASHION_MNIST, split="t10k")
  config.data.positive_classes = ("5", "7", "9")
  config.pretrain.data.source = "omniglot"
  config.pretrain.data.kwargs = dict(
      path=experiment.data_dir("omniglot", "images_background_small1.zip"))
  config.model.name = "vit_tiny"
  config.model.kwargs = dict(image_size=28, patch_size=4, width=64, depth=4, num_heads=2,
                             mlp_features=128, num_prompts=4)
  config.pretrain.steps = 600
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 1e-3
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 100
  config.task.kind = "transfer"
  config.task.test_fraction = 0.2
  config.task.train_examples = 1000
  config.task.num_tasks = 5  # Seeds.
  config.adapt.mode = "lp"
  config.adapt.head = "linear"
  config.adapt.steps = 200
  config.adapt.batch_size = 100
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      backprop=experiment.method("backprop", learning_rate=1e-3, optimizer="adam"),
      ff=experiment.method("ff", learning_rate=1e-3, num_directions=3, optimizer="adam"),
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-3, num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=1e-3, num_directions=3),
  )
  if arg in ("dvpt", "tiny_dvpt"):
    config.adapt.mode = "dvpt"
  if arg in ("tiny", "tiny_dvpt"):
    experiment.shrink_for_tests(config)
    config.data.max_examples = 300
    config.pretrain.data.kwargs.max_per_class = 4
    config.task.train_examples = 100
    config.model.kwargs = dict(image_size=28, patch_size=7, width=16, depth=1, num_heads=2,
                               mlp_features=32, num_prompts=2)
  return config
