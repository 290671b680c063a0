"""In-domain out-of-distribution adaptation (the paper's CIFAR-10-C setting): a model trained on
clean images adapts to corrupted ones (severity 1 / 3 / 5 = easy / medium / hard), 90/10 split,
LP-1, LP-3 and D-VPT, optionally with a 90%-sparse update.

  python train.py --config configs/ood.py --workdir workdirs/ood

Offline default: a small ViT pre-trained on a clean stratified half of the scikit-learn digits
(``task.pretrain_fraction``) adapts to the other half with Gaussian noise at severity 5
(``fwdgrad.data.corruptions``), so no example it scores was seen in pre-training. LP-1 starts from
the pre-trained classifier (``adapt.head = "pretrained"``), so zero-shot is that classifier.
Other corruptions and severities:
``--config.data.corruption=contrast --config.data.severity=3``.

The paper's setting, for users with the TFDS datasets prepared: ``--config.task.pretrain_fraction=0
--config.pretrain.data.source=tfds:cifar10 --config.data.source=tfds:cifar10_corrupted/gaussian_noise_5 --config.data.corruption=''``
with ``data_dir`` in both ``kwargs`` and ViT-tiny (``model.kwargs.image_size=32``).
Variants: ``get_config("lp3")``, ``get_config("dvpt")``, ``get_config("sparse")`` (90%-sparse
D-VPT) and ``get_config("tiny")`` for tests.
"""

from fwdgrad import experiment


def get_config(arg=None):
  arg = experiment.config_variant(arg, ("tiny", "lp3", "dvpt", "sparse"), "configs/ood.py",
                                  combinable=True)
  config = experiment.default_config()
  config.data.source = "digits"
  config.data.corruption = "gaussian_noise"
  config.data.severity = 5
  config.model.name = "vit_tiny"
  config.model.kwargs = dict(image_size=8, patch_size=2, width=64, depth=4, num_heads=2,
                             mlp_features=128, num_prompts=4)
  config.pretrain.steps = 600
  config.pretrain.batch_size = 128
  config.pretrain.learning_rate = 1e-3
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 100
  config.task.kind = "transfer"
  config.task.pretrain_fraction = 0.5
  config.task.test_fraction = 0.1
  config.task.num_tasks = 3  # Seeds.
  config.adapt.mode = "lp"
  config.adapt.head = "pretrained"
  config.adapt.steps = 200
  config.adapt.batch_size = 128
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      # What fixed-point inference alone costs: the pre-trained classifier at 16w8a.
      zero_shot_16w8a=experiment.method("zero_shot", precision="16w8a"),
      backprop=experiment.method("backprop", learning_rate=1e-3, optimizer="adam"),
      ff=experiment.method("ff", learning_rate=1e-3, num_directions=3, optimizer="adam"),
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-3, num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=1e-3, num_directions=3),
  )
  if "lp3" in arg:
    config.adapt.head = "mlp3"
  if "dvpt" in arg or "sparse" in arg:
    config.adapt.mode = "dvpt"
  if "sparse" in arg:
    config.adapt.sparsity = 0.9
  if "tiny" in arg:
    experiment.shrink_for_tests(config)
    config.model.kwargs = dict(image_size=8, patch_size=4, width=16, depth=1, num_heads=2,
                               mlp_features=32, num_prompts=2)
  return config
