"""The notebooks in colabs/: stored without outputs, and each runs top to bottom at a small size.

Each notebook reads ``FWDGRAD_NOTEBOOK_SMALL=1`` in its first code cell and shrinks its step counts;
the install cell (tagged ``skip-execution``) is skipped, as there is no network. The kernel is this
interpreter (``sys.executable``) through a kernelspec written to a temporary ``JUPYTER_PATH``, so the
test runs the same in a fresh virtual environment as here (nbclient, nbformat and ipykernel come
with the ``dev`` extras). After editing a notebook, ``python scripts/strip_notebooks.py`` removes
its outputs.
"""

import glob
import json
import os
import re
import sys

import nbclient
import nbformat
import pytest

import fwdgrad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))
KERNEL_NAME = "fwdgrad-notebook-test"
SKIP_TAG = "skip-execution"


def _names(paths):
  return [os.path.basename(path) for path in paths]


def test_notebooks_exist():
  assert set(_names(NOTEBOOKS)) >= {
      "quickstart.ipynb", "fixed_point_adaptation.ipynb", "loss_landscape.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_names(NOTEBOOKS))
def test_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  with open(path) as f:  # nbformat.read adds missing cell ids; the stored file must have them.
    assert all("id" in cell for cell in json.load(f)["cells"]), "a cell has no id"
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"cell {index} has outputs; run scripts/strip_notebooks.py"
      assert cell.execution_count is None, f"cell {index}; run scripts/strip_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_names(NOTEBOOKS))
def test_install_cell_installs_the_clone_it_sits_in(path, monkeypatch):
  """Run with the %pip line read, not executed (no network): it names this clone, editable."""
  cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
  lines = cell.source.splitlines()
  python = "\n".join(line for line in lines if not line.startswith("%pip"))
  (pip,) = [line for line in lines if line.startswith("%pip")]
  monkeypatch.chdir(os.path.dirname(path))
  namespace = {}
  exec(compile(python, path, "exec"), namespace)  # pylint: disable=exec-used
  target = pip.split("-e ", 1)[1].strip().strip('"').format(**namespace)
  assert target == f"{os.path.realpath(os.path.dirname(os.path.dirname(path)))}[train]"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_names(NOTEBOOKS))
def test_install_cell_first_and_public_api_only(path):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert "%pip install" in code[0].source and SKIP_TAG in code[0].metadata.get("tags", [])
  assert all(SKIP_TAG not in cell.metadata.get("tags", []) for cell in code[1:])
  assert "FWDGRAD_NOTEBOOK_SMALL" in code[1].source
  source = "\n".join(cell.source for cell in code)
  assert "from fwdgrad" not in source and "import fwdgrad." not in source
  # Every fwdgrad name used is public: in fwdgrad.__all__ (or the experiment-config module the
  # configs use), or in the __all__ of fwdgrad.data / fwdgrad.models.
  used = re.findall(r"\bfwdgrad\.(\w+)(?:\.(\w+))?", source)
  assert used
  for name, attribute in used:
    assert name in fwdgrad.__all__ or name == "experiment", f"fwdgrad.{name} is not public"
    if name in ("data", "models") and attribute:
      assert attribute in getattr(fwdgrad, name).__all__, f"fwdgrad.{name}.{attribute}"
    if name == "experiment":
      assert attribute in ("method",), f"fwdgrad.experiment.{attribute}"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec that starts this interpreter, found through JUPYTER_PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "fwdgrad test", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("FWDGRAD_NOTEBOOK_SMALL", "1")
  return KERNEL_NAME


def _execute(path, kernel_name, workdir):
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, kernel_name=kernel_name, timeout=300, skip_cells_with_tag=SKIP_TAG,
      resources={"metadata": {"path": str(workdir)}})
  client.execute()
  errors = [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]
  assert not errors, errors
  return notebook


def _text(notebook):
  return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream")


def _num_images(notebook):
  return sum("image/png" in output.get("data", {}) for cell in notebook.cells
             if cell.cell_type == "code" for output in cell.outputs)


@pytest.mark.slow
def test_quickstart_runs(kernel_name, tmp_path):
  notebook = _execute(os.path.join(REPO, "colabs", "quickstart.ipynb"), kernel_name, tmp_path)
  text = _text(notebook)
  assert "forward gradient (jvp): held-out accuracy" in text and "backprop: held-out accuracy" in text
  assert _num_images(notebook) >= 1


@pytest.mark.slow
def test_fixed_point_adaptation_runs(kernel_name, tmp_path):
  notebook = _execute(os.path.join(REPO, "colabs", "fixed_point_adaptation.ipynb"), kernel_name,
                      tmp_path)
  text = _text(notebook)
  for name in ("zero_shot", "backprop", "qzo_ff_16w8a", "qzo_ff_8w8a"):
    assert name in text
  assert "integer weights changed by adaptation: 0 of" in text  # 8w8a, checked in the notebook too
  assert _num_images(notebook) >= 3


@pytest.mark.slow
def test_loss_landscape_runs(kernel_name, tmp_path):
  notebook = _execute(os.path.join(REPO, "colabs", "loss_landscape.ipynb"), kernel_name, tmp_path)
  text = _text(notebook)
  assert "BP: the plane explains" in text and "FF: the plane explains" in text
  assert "saved and reloaded" in text
  assert _num_images(notebook) == 2
