"""Audio few-shot (the paper's Table 2 setting): 5-way 1-shot, speaker- and class-disjoint.

  FWDGRAD_DATA_DIR=/path/to/data python train.py --config configs/fewshot_audio.py \
      --workdir workdirs/fewshot_audio

Offline default: the Free Spoken Digit Dataset at ``$FWDGRAD_DATA_DIR/fsdd/recordings``
(``{digit}_{speaker}_{index}.wav``, 8 kHz, resampled to 16 kHz). Half the speakers and half the
digits pre-train a CRNN on log-mel features; tasks are 5-way 1-shot episodes of the other digits
spoken by the other speakers.

``get_config("speech_embedding")`` adapts the real pre-trained openWakeWord speech embedding
instead (no pre-training): set ``FWDGRAD_OPENWAKEWORD_DIR`` to a directory holding the
``pyopen-wakeword==1.1.0`` wheel (``pip download --no-deps pyopen-wakeword==1.1.0 -d DIR``).

The paper's datasets: ESC-50 (``--config.data.source=wav_folder`` with
``data.kwargs={'path': '/path/ESC-50/audio', 'pattern': fwdgrad.data.ESC50_PATTERN}``) or
FSDKaggle2018 laid out the same way. ``get_config("tiny")`` is the pipeline at a size for tests.
"""

import os

from fwdgrad import experiment


def get_config(arg=None):
  experiment.config_variant(arg, ("tiny", "speech_embedding", "tiny_speech_embedding"), "configs/fewshot_audio.py")
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
  config.task.split_by = "class_and_group"
  config.task.split_sizes = (0.5, 0.0, 0.5)
  config.task.group_split = (0.5, 0.5)
  config.task.ways = 5
  config.task.shots = 1
  config.task.queries = 15
  config.task.num_tasks = 100
  config.adapt.mode = "ft"
  config.adapt.head = "simpleshot"
  config.adapt.steps = 30
  config.methods = dict(
      zero_shot=experiment.method("zero_shot"),
      backprop=experiment.method("backprop", learning_rate=1e-3, optimizer="adam"),
      ff=experiment.method("ff", learning_rate=1e-3, num_directions=3, optimizer="sgd"),
      qzo_ff_16w8a=experiment.method("qzo_ff", precision="16w8a", learning_rate=1e-4, num_directions=3),
      qzo_ff_8w8a=experiment.method("qzo_ff", precision="8w8a", learning_rate=1e-4, num_directions=3),
  )
  if arg in ("speech_embedding", "tiny_speech_embedding"):
    config.model.name = "speech_embedding"
    config.pretrain.init_checkpoint = os.environ.get("FWDGRAD_OPENWAKEWORD_DIR", "openwakeword")
  if arg in ("tiny", "tiny_speech_embedding"):
    experiment.shrink_for_tests(config)
    config.data.max_examples = 300  # A random subset keeps every speaker.
    if config.model.name == "crnn":
      config.model.kwargs = dict(conv_features=(4, 4, 4), rnn_features=8)
  return config
