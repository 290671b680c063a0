"""Vision few-shot (the paper's Table 1 setting): 5-way 5-shot, ProtoNets head, 100 test tasks,
full fine-tuning of the backbone with the episode loss on the support set.

  FWDGRAD_DATA_DIR=/path/to/data python train.py --config configs/fewshot_vision.py \
      --workdir workdirs/fewshot_vision

Offline default, cross-domain: a Conv4 (32 channels) is pre-trained with backprop on clean
Fashion-MNIST (clothing; the 60k training split of Debian's ``dataset-fashion-mnist`` at
``/usr/share/datasets/fashion-mnist``) and adapted to 5-way 5-shot episodes of handwritten
characters: Omniglot, both "background small" sets (28x28, ``alphabet/character/*.png``, zipped) at
``$FWDGRAD_DATA_DIR/omniglot/images_background_small{1,2}.zip``: 8 alphabets, 242 characters. One
alphabet, the same for every seed, is set aside for tuning (``--config.task.tune=True`` draws its
episodes there); the tasks are drawn from the other seven. Zero-shot is ProtoNets on the
pre-trained features of the support set.

Variants: ``indomain`` pre-trains on the characters of 4 alphabets and draws the tasks from 3
others (alphabet-disjoint; one more alphabet for tuning); ``steps`` is a tuning run of
sign-m-SPSA and QZO-FF 16w8a at 100 / 300 / 1,000 steps (with ``--config.task.tune=True``);
``enhance`` runs QZO-FF 16w8a at m = 1 and with the enhancements (momentum-guided sampling,
sharpness-aware, kernel-wise, both), next to zero-shot, backprop and QZO-FF 16w8a at m = 3;
``tiny`` is the pipeline at a size for tests (with ``indomain``: ``indomain_tiny``).

The paper's datasets, for users who have them (override on the command line):
  CIFAR-FS (CIFAR-100 few-shot split, 32x32):  --config.data.source=tfds:cifar100
      --config.data.kwargs="{'data_dir': '/path/to/tensorflow_datasets'}"
  CUB / miniImageNet / tieredImageNet (84x84):  --config.data.source=image_folder
      --config.data.kwargs="{'path': '/path/to/images', 'image_size': 84, 'channels': 3}"
      --config.model.name=resnet12   (or resnet18 / vit_tiny with model.kwargs.image_size=84)
Learning rates come from ``--config.task.tune=True`` runs over ``config.tune_grid``
(docs/RESULTS.md has the commands and tables).
"""

from fwdgrad import experiment

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MAIN = ("zero_shot", "zero_shot_16w8a", "backprop", "ff", "spsa", "qzo_ff_16w8a", "qzo_ff_8w8a")
ENHANCE = ("zero_shot", "backprop", "qzo_ff_16w8a", "qzo_ff_16w8a_m1", "qzo_ff_16w8a_momentum",
           "qzo_ff_16w8a_sharpness", "qzo_ff_16w8a_kernelwise", "qzo_ff_16w8a_sharpness_kernelwise")


def get_config(arg=None):
  variants = experiment.config_variant(arg, ("indomain", "steps", "enhance", "tiny"),
                                       "configs/fewshot_vision.py", combinable=True)
  config = experiment.default_config()
  config.data.source = "omniglot"
  config.data.kwargs = dict(path=(experiment.data_dir("omniglot", "images_background_small1.zip"),
                                  experiment.data_dir("omniglot", "images_background_small2.zip")))
  config.pretrain.data.source = "idx"
  config.pretrain.data.kwargs = dict(path=FASHION_MNIST, split="train")
  config.pretrain.val_fraction = 0.05
  config.pretrain.min_val_accuracy = 0.85
  config.model.name = "conv4"
  config.model.kwargs = dict(features=(32, 32, 32, 32))
  config.pretrain.steps = 1000
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 3e-3
  config.pretrain.log_every = 100
  config.pretrain.checkpoint_every = 500
  # Whole alphabets: (no base part: pre-trained on Fashion-MNIST, 1 alphabet for tuning, the rest).
  config.task.split_by = "group"
  config.task.split_sizes = (0, 1, 7)
  config.task.ways = 5
  config.task.shots = 5
  config.task.queries = 15
  config.task.num_tasks = 100
  config.adapt.mode = "ft"
  config.adapt.head = "protonet"
  config.adapt.steps = 100
  # The best point of each method's row of config.tune_grid (a config.task.tune run).
  config.methods = experiment.paper_methods(
      learning_rate=1e-2, backprop_learning_rate=3e-3, backprop_steps=100,
      ff=dict(learning_rate=3e-3), qzo_ff_8w8a=dict(epsilon=4e-3))
  all_methods = config.methods
  config.methods = {name: all_methods[name] for name in MAIN}
  lrs = (1e-3, 3e-3, 1e-2, 3e-2)
  config.tune_grid = dict(
      backprop=dict(learning_rate=(3e-4, 1e-3, 3e-3), steps=(30, 100)),
      ff=dict(learning_rate=lrs),
      spsa=dict(learning_rate=lrs),
      qzo_ff_16w8a=dict(learning_rate=lrs),
      qzo_ff_8w8a=dict(learning_rate=lrs, epsilon=(1e-3, 4e-3)),
  )
  if "steps" in variants:  # What more steps buy the forward gradients (a tuning run).
    config.methods = {name: config.methods[name] for name in ("zero_shot", "spsa", "qzo_ff_16w8a")}
    config.tune_grid = dict(spsa=dict(learning_rate=(3e-3, 1e-2), steps=(100, 300, 1000)),
                            qzo_ff_16w8a=dict(learning_rate=(3e-3, 1e-2), steps=(300,)))
  if "enhance" in variants:  # m = 1 and the enhancements (Sec. 3.4) on QZO-FF 16w8a.
    config.methods = {name: all_methods[name] for name in ENHANCE}
    # The tuning run's choice (the others' best points are the defaults: 1e-2, kernel-wise 3e-2).
    config.methods.qzo_ff_16w8a_m1.learning_rate = 3e-3
    kernelwise = (1e-2, 3e-2, 1e-1)  # Their step is η‖w^i‖ per kernel: a larger η.
    config.tune_grid = dict(qzo_ff_16w8a_m1=dict(learning_rate=lrs[1:]),
                            qzo_ff_16w8a_momentum=dict(learning_rate=lrs[1:]),
                            qzo_ff_16w8a_sharpness=dict(learning_rate=lrs[1:]),
                            qzo_ff_16w8a_kernelwise=dict(learning_rate=kernelwise),
                            qzo_ff_16w8a_sharpness_kernelwise=dict(learning_rate=kernelwise))
  if "indomain" in variants:
    config.pretrain.data.source = ""  # Pre-train on the base alphabets' characters.
    config.pretrain.val_fraction = 0.1
    config.pretrain.min_val_accuracy = 0.6
    config.task.split_sizes = (4, 1, 3)
  if "tiny" in variants:
    experiment.shrink_for_tests(config)
    config.pretrain.data.max_examples = 400
    config.pretrain.min_val_accuracy = 0.0
    config.model.kwargs = dict(features=(8, 8, 8, 8))
    config.tune_grid = {name: {field: values[:2] for field, values in grid.items()}
                        for name, grid in config.tune_grid.items()}
  return config
