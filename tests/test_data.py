"""Tests of the dataset sources in fwdgrad/data (digits, IDX, image folders, WAV folders, TFDS).

The real-data tests read the shared data folder named by $FWDGRAD_DATA_DIR (default:
``../shared/data`` beside the repository) and Fashion-MNIST from the Debian package
``dataset-fashion-mnist``; they are skipped, saying why, where those are absent.
"""

import io
import os
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from fwdgrad import data
from fwdgrad.data import audio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("FWDGRAD_DATA_DIR",
                             os.path.join(os.path.dirname(REPO), "shared", "data"))
OMNIGLOT = [os.path.join(SHARED_DATA, "omniglot", f"images_background_small{i}.zip")
            for i in (1, 2)]
FSDD = os.path.join(SHARED_DATA, "fsdd", "recordings")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _require(path):
  if not os.path.exists(path):
    pytest.skip(f"{path} is absent; set FWDGRAD_DATA_DIR to the shared data folder.")


# Digits ---------------------------------------------------------------------------------------


def test_digits_shape_range_and_labels():
  from sklearn import datasets
  digits = data.load_dataset("digits")
  assert digits.inputs.shape == (1797, 8, 8, 1) and digits.inputs.dtype == np.float32
  assert digits.inputs.min() == 0.0 and digits.inputs.max() == 1.0
  assert digits.labels.dtype == np.int32
  np.testing.assert_array_equal(digits.labels, datasets.load_digits().target)
  assert digits.class_names == tuple("0123456789")
  assert np.bincount(digits.labels).min() >= 170
  assert digits.groups is None and digits.sample_rate is None


def test_digits_resized_for_a_backbone_of_another_size():
  small = data.load_digits()
  big = data.load_dataset("digits", image_size=28)
  assert big.inputs.shape == (1797, 28, 28, 1) and big.inputs.dtype == np.float32
  assert 0.0 <= big.inputs.min() and big.inputs.max() <= 1.0
  np.testing.assert_array_equal(big.labels, small.labels)
  # Bilinear: the mean brightness of each image is kept up to the border effects.
  np.testing.assert_allclose(big.inputs.mean(axis=(1, 2, 3)), small.inputs.mean(axis=(1, 2, 3)),
                             atol=0.05)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    data.load_digits(image_size=0)


def test_split_examples_is_stratified_disjoint_and_seeded():
  digits = data.load_digits()
  train, test = data.split_examples(digits, 0.2, seed=0)
  assert train.num_examples + test.num_examples == digits.num_examples
  np.testing.assert_allclose(np.bincount(test.labels) / np.bincount(digits.labels), 0.2, atol=0.01)
  again = data.split_examples(digits, 0.2, seed=0)[1]
  np.testing.assert_array_equal(again.inputs, test.inputs)
  other = data.split_examples(digits, 0.2, seed=1)[1]
  assert not np.array_equal(other.inputs, test.inputs)
  # No test image is also a train image (digits has a few duplicate images, so compare rows).
  rows = {r.tobytes() for r in train.inputs.reshape(train.num_examples, -1)}
  duplicates = sum(r.tobytes() in rows for r in test.inputs.reshape(test.num_examples, -1))
  assert duplicates < 5


# The registry and its errors ------------------------------------------------------------------


def test_unknown_source_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="Unknown dataset source 'mnistt'.*digits"):
    data.load_dataset("mnistt")


def test_bad_argument_names_the_signature():
  with pytest.raises(ValueError, match="Bad arguments for dataset source 'digits'"):
    data.load_dataset("digits", path="/tmp")


@pytest.mark.parametrize("name", ["idx", "image_folder", "omniglot", "wav_folder", "fsdd"])
def test_missing_path_names_the_path_and_the_fix(name, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=f"not found at '{missing}'.*Pass path="):
    data.load_dataset(name, path=missing)


@pytest.mark.parametrize("name", ["idx", "image_folder", "wav_folder"])
def test_no_path_says_how_to_give_one(name):
  with pytest.raises(ValueError, match="path"):
    data.load_dataset(name)


# IDX ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
  array = (np.random.default_rng(0).normal(size=(5, 3, 4)) * 100).astype(dtype)
  path = tmp_path / f"a-idx3-ubyte{suffix}"
  data.write_idx(path, array)
  back = data.read_idx(path)
  assert back.dtype == array.dtype and back.shape == array.shape
  np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_mnist_one(tmp_path):
  data.write_idx(tmp_path / "l", np.arange(3, dtype=np.uint8))
  raw = (tmp_path / "l").read_bytes()
  assert raw == bytes([0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2])


def test_idx_folder_layout_and_scaling(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 7).astype(np.uint8)
  labels[0] = 9
  data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
  test = data.load_dataset("idx", path=tmp_path, split="test")
  assert test.inputs.shape == (7, 28, 28, 1)
  np.testing.assert_allclose(test.inputs[..., 0], images / 255.0, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(test.labels, labels)
  assert test.num_classes == 10
  with pytest.raises(ValueError, match="No train-images-idx3-ubyte"):
    data.load_idx(tmp_path, split="train")


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
  data.write_idx(tmp_path / "x", np.zeros((4, 2), np.uint8))
  (tmp_path / "cut").write_bytes((tmp_path / "x").read_bytes()[:-1])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(tmp_path / "cut")
  (tmp_path / "png").write_bytes(b"\x89PNG\r\n")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "png")


def test_fashion_mnist_from_the_debian_package():
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip("apt-get install dataset-fashion-mnist to run this test.")
  train = data.load_dataset("idx", path=FASHION_MNIST, split="train")
  test = data.load_dataset("idx", path=FASHION_MNIST, split="test")
  assert train.inputs.shape == (60000, 28, 28, 1) and test.inputs.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  assert 0.2 < train.inputs.mean() < 0.4


# Image folders --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_small1():
  _require(OMNIGLOT[0])
  return data.load_dataset("omniglot", path=OMNIGLOT[0])


def test_omniglot_zip_counts(omniglot_small1):
  ds = omniglot_small1
  assert ds.inputs.shape == (2720, 28, 28, 1)
  assert ds.group_names == ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
  assert ds.num_classes == 136
  np.testing.assert_array_equal(np.bincount(ds.labels), [20] * 136)  # 20 drawers per character.
  # The group of every image is the alphabet in its class name.
  alphabet_of_class = [name.split("/")[0] for name in ds.class_names]
  np.testing.assert_array_equal(
      [ds.group_names[g] for g in ds.groups], [alphabet_of_class[c] for c in ds.labels])
  # Black strokes on white: mostly ones, and the resized images still have dark pixels.
  assert 0.8 < ds.inputs.mean() < 0.97
  assert (ds.inputs.reshape(2720, -1).min(axis=1) < 0.5).all()


def test_omniglot_both_zips_share_two_alphabets_read_once():
  for path in OMNIGLOT:
    _require(path)
  ds = data.load_dataset("omniglot", path=OMNIGLOT, invert=True)
  assert len(ds.group_names) == 8  # 5 + 5 alphabets, Greek and Latin in both.
  assert ds.num_classes == 136 + 156 - (24 + 26)
  assert ds.inputs.shape[0] == 20 * ds.num_classes
  assert 0.03 < ds.inputs.mean() < 0.2  # Inverted: strokes are the nonzero pixels.


def test_unpacked_folder_reads_like_the_zip(tmp_path, omniglot_small1):
  with zipfile.ZipFile(OMNIGLOT[0]) as archive:
    members = [m for m in archive.namelist() if "/Greek/" in m]
    archive.extractall(tmp_path, members)
  folder = data.load_image_folder(tmp_path / "images_background_small1" / "Greek",
                                  layout="class", image_size=28)
  greek = data.subset(omniglot_small1,
                      omniglot_small1.groups == omniglot_small1.group_names.index("Greek"),
                      relabel=True)
  np.testing.assert_array_equal(folder.inputs, greek.inputs)
  np.testing.assert_array_equal(folder.labels, greek.labels)
  assert folder.class_names == tuple(n.split("/")[1] for n in greek.class_names)


def _write_png(path, array, mode):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode=None).convert(mode).save(path)


def test_image_folder_layout_sizes_and_order(tmp_path):
  rng = np.random.default_rng(0)
  for cls, n in (("cat", 2), ("dog", 3)):
    for i in range(n):
      size = (10, 12) if i == 0 else (20, 16)
      _write_png(tmp_path / "pets" / cls / f"img{i + 1}.png",
                 rng.integers(0, 256, size + (3,), dtype=np.uint8), "RGB")
  (tmp_path / "pets" / "README.txt").write_text("not an image")
  with pytest.raises(ValueError, match="different sizes.*image_size"):
    data.load_image_folder(tmp_path / "pets")
  ds = data.load_image_folder(tmp_path / "pets", image_size=(8, 6), channels=3)
  assert ds.inputs.shape == (5, 8, 6, 3) and ds.class_names == ("cat", "dog")
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
  assert ds.groups is None
  one = data.load_image_folder(tmp_path / "pets", image_size=8, max_per_class=1)
  assert one.inputs.shape == (2, 8, 8, 1)


def test_image_folder_pixel_values_exact(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  _write_png(tmp_path / "a" / "x.png", gray, "L")
  ds = data.load_image_folder(tmp_path)
  np.testing.assert_allclose(ds.inputs[0, ..., 0], gray / 255.0, rtol=0, atol=1e-7)


def test_image_folder_without_images_says_so(tmp_path):
  (tmp_path / "a").mkdir()
  with pytest.raises(ValueError, match="No images"):
    data.load_image_folder(tmp_path)
  with pytest.raises(ValueError, match="layout must be one of"):
    data.load_image_folder(tmp_path, layout="flat")


# WAV folders ----------------------------------------------------------------------------------


def test_fsdd_counts_speakers_and_digits():
  _require(FSDD)
  start = time.perf_counter()
  ds = data.load_dataset("fsdd", path=FSDD)
  assert ds.inputs.shape == (3000, 8000) and ds.sample_rate == 8000
  assert ds.class_names == tuple("0123456789")
  assert ds.group_names == ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
  np.testing.assert_array_equal(np.bincount(ds.labels), [300] * 10)
  np.testing.assert_array_equal(np.bincount(ds.groups), [500] * 6)
  assert np.abs(ds.inputs).max() <= 1.0 and np.abs(ds.inputs).max() > 0.1
  assert time.perf_counter() - start < 30


def test_fsdd_subset_resampled_to_16k():
  _require(FSDD)
  ds = data.load_wav_folder(FSDD, sample_rate=16000, clip_seconds=0.5, max_per_class=2)
  assert ds.inputs.shape == (20, 8000) and ds.sample_rate == 16000
  np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(10), 2))
  # Natural order of file names puts 0_george_0.wav first; 2,384 samples at 8 kHz become 4,768
  # at 16 kHz, centred in 8,000, and upsampling by 2 keeps the original samples at even positions.
  raw, rate = audio.read_wav(os.path.join(FSDD, "0_george_0.wav"))
  assert rate == 8000 and raw.size == 2384
  start = (8000 - 2 * raw.size) // 2
  np.testing.assert_array_equal(ds.inputs[0, :start], 0.0)
  np.testing.assert_allclose(ds.inputs[0, start:start + 2 * raw.size:2], raw, atol=0.02)


def test_wav_folder_resampling_padding_and_pattern(tmp_path):
  t = np.arange(800) / 8000.0
  tone = 0.5 * np.sin(2 * np.pi * 440.0 * t)
  for name, length in (("yes-anna-1.wav", 800), ("no-bob-1.wav", 400), ("notes.wav", 10)):
    wavfile.write(tmp_path / name, 8000, (tone[:length] * 32767).astype(np.int16))
  pattern = r"(?P<label>[a-z]+)-(?P<group>[a-z]+)-\d+\.wav"
  ds = data.load_wav_folder(tmp_path, pattern=pattern, sample_rate=16000)
  assert ds.class_names == ("no", "yes") and ds.group_names == ("anna", "bob")
  np.testing.assert_array_equal(ds.labels, [0, 1])
  np.testing.assert_array_equal(ds.groups, [1, 0])
  assert ds.inputs.shape == (2, 1600)  # Padded to the longest clip, at 16 kHz.
  t16 = np.arange(1600) / 16000.0
  middle = slice(100, 1500)  # Away from the edge effects of the resampling filter.
  np.testing.assert_allclose(ds.inputs[1, middle], 0.5 * np.sin(2 * np.pi * 440 * t16)[middle],
                             atol=0.01)
  # The short clip (800 samples at 16 kHz) is centred: 400 zeros on each side.
  np.testing.assert_array_equal(ds.inputs[0, :400], 0.0)
  np.testing.assert_array_equal(ds.inputs[0, 1200:], 0.0)
  assert np.abs(ds.inputs[0, 500:1100]).max() > 0.4
  fixed = data.load_wav_folder(tmp_path, pattern=pattern, clip_seconds=0.025)
  assert fixed.inputs.shape == (2, 200) and fixed.sample_rate == 8000
  np.testing.assert_allclose(fixed.inputs[1], tone[300:500], atol=1e-4)  # Cropped centrally.
  with pytest.raises(ValueError, match="No file under .* matches pattern"):
    data.load_wav_folder(tmp_path)
  with pytest.raises(ValueError, match="named group"):
    data.load_wav_folder(tmp_path, pattern=r".*\.wav")
  wavfile.write(tmp_path / "maybe-carl-1.wav", 16000, (tone * 32767).astype(np.int16))
  with pytest.raises(ValueError, match="different sample rates.*sample_rate="):
    data.load_wav_folder(tmp_path, pattern=pattern)


def test_esc50_file_names(tmp_path):
  for name in ("1-100032-A-0.wav", "1-100038-A-14.wav", "5-9032-A-0.wav", "2-102414-C-17.wav"):
    wavfile.write(tmp_path / name, 8000, np.full(40, 1000, np.int16))
  ds = data.load_wav_folder(tmp_path, pattern=data.ESC50_PATTERN)
  assert ds.class_names == ("0", "14", "17") and ds.group_names == ("1", "2", "5")
  np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0])
  np.testing.assert_array_equal(ds.groups, [0, 0, 1, 2])
  np.testing.assert_allclose(ds.inputs, 1000 / 32768, rtol=1e-6)


# TFDS -----------------------------------------------------------------------------------------


def test_tfds_offline_fails_at_once_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(ValueError, match="'mnist' is not prepared.*tfds build mnist"):
    data.load_dataset("tfds:mnist", data_dir=tmp_path)
  with pytest.raises(ValueError, match="neither a TFDS dataset name"):
    data.load_dataset("tfds", name="no_such_dataset_anywhere", data_dir=tmp_path)
  assert time.perf_counter() - start < 10


def _prepare_tiny_tfds(data_dir):
  """Writes a 3-class image dataset as array_record files, as `tfds build` would."""
  import tensorflow_datasets as tfds

  class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(6, 5, 1)),
              "label": tfds.features.ClassLabel(names=["ring", "dot", "bar"]),
              "author": tfds.features.Text()}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(9), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
      for i in range(n):
        png = io.BytesIO()  # Encoded here with PIL: encoding arrays would need TensorFlow.
        Image.fromarray(np.full((6, 5), 10 * i, np.uint8)).save(png, format="PNG")
        yield i, {"image": png.getvalue(), "label": i % 3, "author": f"a{i % 2}"}

  TinyShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return "tiny_shapes"


def test_tfds_reads_a_prepared_array_record_dataset(tmp_path):
  name = _prepare_tiny_tfds(tmp_path)
  train = data.load_dataset(f"tfds:{name}", data_dir=tmp_path, group_key="author")
  assert train.inputs.shape == (9, 6, 5, 1) and train.class_names == ("ring", "dot", "bar")
  np.testing.assert_array_equal(np.sort(train.labels), np.sort(np.arange(9) % 3))
  # Each image is constant 10 * i with label i % 3: decoded pixels and labels stay paired.
  i = np.round(train.inputs[:, 0, 0, 0] * 255 / 10).astype(int)
  np.testing.assert_array_equal(train.labels, i % 3)
  np.testing.assert_array_equal(train.groups, i % 2)
  test = data.load_tfds(name, split="test", data_dir=tmp_path, image_size=3, max_examples=2)
  assert test.inputs.shape == (2, 3, 3, 1)
  with pytest.raises(ValueError, match="Cannot read split 'validation'.*'test', 'train'"):
    data.load_tfds(name, split="validation", data_dir=tmp_path)
  with pytest.raises(ValueError, match="label_key='colour' is not a feature"):
    data.load_tfds(name, data_dir=tmp_path, label_key="colour")
