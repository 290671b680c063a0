"""Tests of fwdgrad/models/speech_embedding.py and fwdgrad/models/tflite_import.py.

The pre-trained network is compared with openWakeWord's ``embedding_model.tflite`` run by a real
TFLite interpreter on real FSDD clips, on the same input and end to end from audio (see
tests/conftest.py for how the wheel and data are provided).
"""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwdgrad import models
from fwdgrad.data import audio
from fwdgrad.models import speech_embedding
from fwdgrad.models import tflite_import

EMBEDDING_MODEL = "embedding_model.tflite"
MEL_MODEL = "melspectrogram.tflite"
NUM_PARAMETERS = 328_224


@pytest.fixture(scope="module")
def pretrained(openwakeword_dir):
  return speech_embedding.load_pretrained(openwakeword_dir)


@pytest.fixture(scope="module")
def fsdd_audio(fsdd_dir):
  """40 FSDD clips (every 75th file: all digits and speakers) at 16 kHz, 12,512 samples each."""
  files = sorted(glob.glob(os.path.join(fsdd_dir, "*.wav")))[::75]
  return np.stack([audio.fit_length(audio.resample(*audio.read_wav(f))) for f in files])


def _init(model, seed=0):
  """Variables shaped by ``model.init`` (traced with ``jax.eval_shape``), filled with He-scaled
  normals from numpy: running the initialisers op by op would cost seconds per test."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 76, 32)))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), jnp.float32)

  return jax.tree.map(fill, shapes)


@pytest.fixture(scope="module")
def embed():
  """The float network, jitted once for the module (the FSDD batches share one shape)."""
  return jax.jit(speech_embedding.SpeechEmbedding().apply)


def test_shapes_head_and_registry():
  model = speech_embedding.SpeechEmbedding()
  variables = _init(model)
  assert speech_embedding.num_parameters(variables) == NUM_PARAMETERS
  assert sorted(variables["params"]) == sorted(f"conv{i}" for i in range(20))
  x = jax.random.normal(jax.random.key(1), (2, 76, 32))
  out = model.apply(variables, x)
  assert out.shape == (2, 96)
  chex.assert_trees_all_close(model.apply(variables, x[..., None]), out, atol=0, rtol=0)

  head = models.get_model("speech_embedding", num_classes=10, precision="16w8a")
  assert isinstance(head, speech_embedding.SpeechEmbedding) and head.precision == "16w8a"
  head_variables = _init(head)
  assert speech_embedding.num_parameters(head_variables) == NUM_PARAMETERS + 96 * 10 + 10
  assert head.clone(precision="float").apply(head_variables, x).shape == (2, 10)


def test_rejects_wrong_input_shape():
  model = speech_embedding.SpeechEmbedding()
  variables = _init(model)
  with pytest.raises(ValueError, match="76, 32"):
    model.apply(variables, jnp.zeros((2, 50, 32)))
  with pytest.raises(ValueError, match="num_classes"):
    speech_embedding.SpeechEmbedding(num_classes=0).apply(variables, jnp.zeros((1, 76, 32)))


def test_load_pretrained_parameter_count_and_layout(openwakeword_dir, pretrained, tmp_path):
  assert speech_embedding.num_parameters(pretrained) == NUM_PARAMETERS
  init_shapes = jax.tree.map(jnp.shape, _init(speech_embedding.SpeechEmbedding()))
  assert jax.tree.map(jnp.shape, pretrained) == init_shapes
  # TFLite's (out, kh, kw, in) kernel of the stem becomes Flax's (kh, kw, in, out).
  graph = tflite_import.read_tflite(tflite_import.find_tflite(openwakeword_dir, EMBEDDING_MODEL))
  stem = graph.constant(graph.operators[1].inputs[1])
  kernel = pretrained["params"]["conv0"]["kernel"]
  np.testing.assert_array_equal(kernel[1, 2, 0, 5], stem[5, 1, 2, 0])
  # Reading the wheel file itself gives the same weights as reading its directory.
  wheel = sorted(glob.glob(os.path.join(openwakeword_dir, "*.whl")))
  if wheel:
    chex.assert_trees_all_close(speech_embedding.load_pretrained(wheel[0]), pretrained, atol=0)
  # So does the extracted .tflite, given as a file or found in a directory tree.
  extracted = tmp_path / "models" / EMBEDDING_MODEL
  extracted.parent.mkdir()
  extracted.write_bytes(tflite_import.find_tflite(openwakeword_dir, EMBEDDING_MODEL))
  for path in (extracted, tmp_path):
    chex.assert_trees_all_close(speech_embedding.load_pretrained(path), pretrained, atol=0)


def test_load_pretrained_into_variables_keeps_the_head(openwakeword_dir, pretrained):
  model = speech_embedding.SpeechEmbedding(num_classes=5)
  variables = _init(model)
  loaded = speech_embedding.load_pretrained(openwakeword_dir, variables)
  chex.assert_trees_all_close(loaded["params"]["head"], variables["params"]["head"], atol=0)
  chex.assert_trees_all_close(loaded["params"]["conv7"], pretrained["params"]["conv7"], atol=0)
  with pytest.raises(ValueError, match="conv0"):
    speech_embedding.load_pretrained(openwakeword_dir, {"params": {"head": {}}})


def test_importer_rejects_other_files(openwakeword_dir, tmp_path):
  mel_graph = tflite_import.read_tflite(tflite_import.find_tflite(openwakeword_dir, MEL_MODEL))
  with pytest.raises(ValueError, match="operator 0"):
    speech_embedding.params_from_graph(mel_graph)
  with pytest.raises(ValueError, match="TFL3"):
    tflite_import.read_tflite(b"not a flatbuffer at all")
  with pytest.raises(ValueError, match="pip download"):
    speech_embedding.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="does not exist"):
    speech_embedding.load_pretrained(tmp_path / "missing")


def test_embedding_matches_tflite_on_fsdd(pretrained, fsdd_audio, run_tflite, embed):
  features = audio.embedding_features(fsdd_audio)
  reference = run_tflite(EMBEDDING_MODEL, features[..., None]).reshape(-1, 96)
  ours = embed(pretrained, features)
  assert np.abs(reference).max() > 10  # Real, non-degenerate embeddings.
  # Float32 with another summation order; the embeddings reach about 90 (float32 spacing 7.6e-6).
  chex.assert_trees_all_close(ours, reference, atol=1e-4, rtol=0)


def test_end_to_end_matches_tflite_on_fsdd(pretrained, fsdd_audio, run_tflite, embed):
  mels = np.stack([run_tflite(MEL_MODEL, (x * audio.PCM_SCALE)[None])[0, 0] for x in fsdd_audio])
  reference = run_tflite(EMBEDDING_MODEL, (mels / 10 + 2)[..., None]).reshape(-1, 96)
  ours = embed(pretrained, audio.embedding_features(fsdd_audio))
  chex.assert_trees_all_close(ours, reference, atol=1e-4, rtol=0)


def test_16w8a_stays_close_to_float(pretrained, fsdd_audio, embed):
  features = audio.embedding_features(fsdd_audio)
  full = embed(pretrained, features)
  model = speech_embedding.SpeechEmbedding(precision="16w8a")
  fixed = jax.jit(model.apply)(models.calibrate(model, pretrained, features), features)
  norms = jnp.linalg.norm(full, axis=-1) * jnp.linalg.norm(fixed, axis=-1)
  cosine = jnp.sum(full * fixed, -1) / norms
  assert float(cosine.min()) > 0.99
  assert float(jnp.abs(full - fixed).max()) > 1e-3  # The activations were really rounded.


@pytest.mark.parametrize("precision", ["float", pytest.param("16w8a", marks=pytest.mark.slow)])
def test_jvp_through_the_model_equals_the_gradient(precision):
  model = speech_embedding.SpeechEmbedding(num_classes=3, precision=precision)
  x = jax.random.normal(jax.random.key(1), (4, 76, 32)) * 0.5 + 2.0
  variables = models.calibrate(model, _init(model), x)
  labels = jnp.array([0, 1, 2, 0])

  def loss(params):
    logits = model.apply({**variables, "params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  params = variables["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  tangent = jax.tree.unflatten(tree, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  # One compilation for both: jvp (forward mode) and grad (reverse mode, from the custom JVPs).
  (value, directional), grads = jax.jit(
      lambda p, t: (jax.jvp(loss, (p,), (t,)), jax.grad(loss)(p)))(params, tangent)
  expected = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent)))
  assert np.isfinite(float(value)) and abs(float(expected)) > 1e-3
  np.testing.assert_allclose(float(directional), float(expected), rtol=1e-4)
