"""Audio few-shot (the paper's Table 2 setting): 5-way 5-shot (or 1-shot), speaker- and
class-disjoint, the backbone fine-tuned with the episode loss on augmented views of the support.

  FWDGRAD_DATA_DIR=/path/to/data python train.py --config configs/fewshot_audio.py \
      --workdir workdirs/fewshot_audio

Offline default: the Free Spoken Digit Dataset at ``$FWDGRAD_DATA_DIR/fsdd/recordings``
(``{digit}_{speaker}_{index}.wav``, 8 kHz, resampled to 16 kHz). The classes (digits) are cut in
half once over the whole dataset, and the six speakers into 2 for pre-training, 1 for tuning (the
same speaker for every seed; ``--config.task.tune=True`` draws its episodes from that speaker's
recordings of the task digits) and 3 for the tasks. A CRNN is pre-trained on log-mel features of
the pre-training digits by the pre-training speakers; tasks are 5-way episodes of the other digits
spoken by the task speakers.

The adaptation objective is ProtoNets' episode loss with the support set's prototypes and, as
queries, a new random view of each support example per step (``config.adapt.objective =
"views"``: a circular time shift of up to 10% and noise at 10% of the deviation). At 1 shot the
usual objective (the support set as its own queries) is degenerate: every example is its own
prototype, the loss falls to 0 by spreading the prototypes, and nothing about the classes is
learnt; a view has to stay nearer its own prototype than the others.

Variants (joined by ``_``): ``shot1`` is 5-way 1-shot (the paper's); ``steps`` is a tuning run of
FF and sign-m-SPSA at 300 steps (with ``--config.task.tune=True``); ``embedding`` adapts the real
pre-trained openWakeWord speech embedding instead of the CRNN (no pre-training): set
``FWDGRAD_OPENWAKEWORD_DIR`` to a directory holding the ``pyopen-wakeword==1.1.0`` wheel (``pip
download --no-deps pyopen-wakeword==1.1.0 -d DIR``); ``tiny`` is the pipeline at a size for tests.

The paper's datasets: ESC-50 (``--config.data.source=wav_folder`` with
``data.kwargs={'path': '/path/ESC-50/audio', 'pattern': fwdgrad.data.ESC50_PATTERN}``) or
FSDKaggle2018 laid out the same way.
"""

import os

from fwdgrad import experiment


def get_config(arg=None):
  variants = experiment.config_variant(arg, ("shot1", "embedding", "steps", "tiny"),
                                       "configs/fewshot_audio.py", combinable=True)
  config = experiment.default_config()
  config.data.source = "wav_folder"
  config.data.kwargs = dict(path=experiment.data_dir("fsdd", "recordings"), sample_rate=16000,
                            clip_seconds=12512 / 16000)  # The 76 log-mel frames of one embedding.
  config.data.frontend = "log_mel"
  config.model.name = "crnn"
  config.pretrain.steps = 600
  config.pretrain.batch_size = 64
  config.pretrain.learning_rate = 3e-3
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 100
  config.pretrain.min_val_accuracy = 0.9
  config.task.split_by = "class_and_group"
  config.task.split_sizes = (0.5, 0.0, 0.5)
  config.task.group_split = (2, 1, 3)
  config.task.ways = 5
  config.task.shots = 5
  config.task.queries = 15
  config.task.num_tasks = 40  # Six methods fine-tune a CRNN per task: 40 fit in 20 min on 2 cores.
  config.adapt.mode = "ft"
  config.adapt.head = "protonet"
  config.adapt.objective = "views"
  config.adapt.augment_axes = (1,)  # Time.
  config.adapt.steps = 30
  # Learning rates from the tuning run on the tuning speaker (docs/RESULTS.md has the grid).
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      backprop=experiment.method("backprop", learning_rate=1e-3, optimizer="adam"),
      ff=experiment.method("ff", learning_rate=1e-3, num_directions=3, optimizer="sgd"),
      spsa=experiment.method("spsa", learning_rate=1e-4, num_directions=3, optimizer="sgd"),
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-4,
                                     num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=3e-3,
                                    num_directions=3),
  )
  lrs = (1e-4, 3e-4, 1e-3, 3e-3)
  config.tune_grid = dict(backprop=dict(learning_rate=lrs), ff=dict(learning_rate=lrs),
                          spsa=dict(learning_rate=lrs), qzo_ff_16w8a=dict(learning_rate=lrs),
                          qzo_ff_8w8a=dict(learning_rate=lrs))
  if "steps" in variants:  # What 10x the steps buys the forward gradients (a tuning run).
    config.methods = {name: config.methods[name] for name in ("zero_shot", "ff", "spsa")}
    config.tune_grid = dict(ff=dict(learning_rate=(1e-3,), steps=(300,)),
                            spsa=dict(learning_rate=(1e-3,), steps=(300,)))
  if "shot1" in variants:
    config.task.shots = 1
  if "embedding" in variants:
    config.model.name = "speech_embedding"
    config.pretrain.init_checkpoint = os.environ.get("FWDGRAD_OPENWAKEWORD_DIR", "openwakeword")
    config.pretrain.min_val_accuracy = 0.0  # Not pre-trained here.
    config.methods["backprop"].learning_rate = 1e-4
  if "tiny" in variants:
    experiment.shrink_for_tests(config)
    config.data.max_examples = 300  # A random subset keeps every speaker.
    config.pretrain.min_val_accuracy = 0.0
    config.task.shots = min(config.task.shots, 2)
    if config.model.name == "crnn":
      config.model.kwargs = dict(conv_features=(4, 4, 4), rnn_features=8)
    config.tune_grid = {name: {field: values[:2] for field, values in grid.items()}
                        for name, grid in config.tune_grid.items()}
  return config
