"""The README's commands and example stay true."""

import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def test_readme_example_runs_and_trains():
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  assert blocks, "the README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  initial = namespace["loss_fn"](namespace["model"].init(
      __import__("jax").random.key(1), namespace["x"]))
  assert float(namespace["loss_fn"](namespace["params"])) < 0.8 * float(initial)
  assert len(blocks[0].strip().splitlines()) <= 30


def test_readme_fixed_point_recipe_runs():
  jax = __import__("jax")
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  namespace = {"jax": jax, "fwdgrad": __import__("fwdgrad")}
  exec(compile(blocks[1], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  variables, tx = namespace["variables"], namespace["tx"]
  logits = namespace["model"].apply(variables, namespace["images"][:2])
  assert logits.shape == (2, 5)
  state = tx.init(variables["params"])
  scales = namespace["fwdgrad"].models.weight_scales(variables)
  assert float(state.weight_scale["head"]["kernel"]) == float(scales["head"]["kernel"])


def test_readme_flax_recipes_run():
  """The TrainState block runs after the first example; the NNX block runs on its own names."""
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  namespace = {}
  exec(compile(blocks[0].replace("range(200)", "range(2)"), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  exec(compile(blocks[2], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert int(namespace["state"].step) == 1 and np.isfinite(float(namespace["loss"]))
  exec(compile(blocks[3], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert int(namespace["optimizer"].step[...]) == 1 and np.isfinite(float(namespace["loss"]))
  assert int(namespace["cnn"].dropout.rngs.count[...]) == 1


def test_readme_gives_exactly_the_two_commands_and_ci_runs_the_test_one():
  commands = re.findall(r"```sh\n(.*?)```", _readme(), re.S)
  assert len(commands) == 2
  main_job, tests = (c.strip() for c in commands)
  assert "train.py --config configs/quickstart.py" in main_job
  assert tests == "bash scripts/test.sh"
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert tests in f.read()
