"""Removes outputs and execution counts from notebooks, so the repository stores only their source.

  python scripts/strip_notebooks.py               # every colabs/*.ipynb
  python scripts/strip_notebooks.py path.ipynb    # the named notebooks

tests/test_notebooks.py fails while a stored notebook still has outputs.
"""

import glob
import os
import sys

import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cell metadata that records a run rather than the notebook (nbclient, Jupyter, Colab).
RUN_METADATA = ("execution", "collapsed", "scrolled", "outputId", "colab")


def strip(path: str) -> bool:
  """Strips one notebook in place; returns whether it changed."""
  notebook = nbformat.read(path, as_version=4)
  before = nbformat.writes(notebook)
  for cell in notebook.cells:
    for key in RUN_METADATA:
      cell.metadata.pop(key, None)
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
  notebook.metadata.pop("widgets", None)
  after = nbformat.writes(notebook)
  if after != before:
    with open(path, "w", encoding="utf-8") as f:
      f.write(after)
  return after != before


def main(paths) -> None:
  paths = paths or sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))
  for path in paths:
    print(("stripped " if strip(path) else "unchanged ") + path)


if __name__ == "__main__":
  main(sys.argv[1:])
