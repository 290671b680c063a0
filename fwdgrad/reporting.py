"""What a training run leaves for a person to look at: metrics, curves and a results table.

* :class:`MetricWriter` appends one JSON object per logged step to ``metrics.jsonl`` and writes the
  same scalars as TensorBoard event files (through ``tensorboardX``, which needs no TensorFlow; when
  it is not installed only the JSON lines are written).
* :func:`plot_curves` draws loss and accuracy curves from the JSON lines into PNG files.
* :func:`results_table` formats the final per-method accuracies (mean and 95% confidence interval
  over tasks) as a markdown table.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from fwdgrad.data.episodes import mean_confidence_interval


def append_record(path: str, row: Mapping) -> None:
  """Appends one JSON line in a single write (a kill leaves at most a torn last line)."""
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


class MetricWriter:
  """Scalars to ``<logdir>/metrics.jsonl`` and TensorBoard event files in ``<logdir>``.

  Args:
    logdir: directory for the files (created).
    tensorboard: also write TensorBoard summaries when ``tensorboardX`` is importable.

  Examples:
    >>> writer = MetricWriter("/tmp/run/pretrain")
    >>> writer.write(100, {"loss": 0.3, "accuracy": 0.9})
    >>> writer.close()
  """

  def __init__(self, logdir: str, *, tensorboard: bool = True):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, "metrics.jsonl")
    self._summary = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError:
        SummaryWriter = None
      if SummaryWriter is not None:
        self._summary = SummaryWriter(logdir)

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after ``step``: a resumed run logs those steps again."""
    rows = [row for row in read_metrics(self.path) if row["step"] <= step]
    write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    append_record(self.path, row)
    if self._summary is not None:
      for name, value in scalars.items():
        self._summary.add_scalar(name, float(value), int(step))
      self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: a kill leaves old or new."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_metrics(path: str, *, repair: bool = True) -> list[dict]:
  """The rows of a JSON-lines file (``metrics.jsonl``, ``tasks/*.jsonl``; empty if it is missing).

  A last line cut short (what a kill during a write leaves) is dropped with a warning and, with
  ``repair``, removed from the file, so the row it held is made again and appends stay whole. A
  bad line before the last is corruption no kill makes: a ``ValueError`` names the file and line.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  lines = text.split("\n")
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  rows, torn = [], False
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as error:
      if i != last:
        raise ValueError(f"{path}, line {i + 1}, is not JSON ({error}); the file is corrupt. "
                         "Delete that line and run again: its row is made again.") from None
      torn = True
  if torn:
    warnings.warn(f"{path}: dropped a torn last line (a run stopped while writing it); its row "
                  "is made again.", TornRecordWarning)
  if repair and (torn or (text.strip() and not text.endswith("\n"))):
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
  return rows


class TornRecordWarning(UserWarning):
  """A JSON-lines record was cut short by an interrupted write and is made again."""


def _figure(width: float, height: float, columns: int):
  """A figure and its axes drawn on an Agg canvas: no pyplot, so a notebook's backend is kept."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, columns, squeeze=False)[0]


def plot_curves(rows: Sequence[Mapping[str, float]], keys: Iterable[str], path: str,
                title: str = "") -> Optional[str]:
  """One panel per key (for example ``loss``, ``accuracy``) against ``step``; saved as PNG.

  Returns:
    ``path``, or ``None`` when no row has any of the keys.
  """
  keys = [k for k in keys if any(k in row for row in rows)]
  if not keys:
    return None
  fig, axes = _figure(4.5 * len(keys), 3.4, len(keys))
  for ax, key in zip(axes, keys):
    points = [(row["step"], row[key]) for row in rows if key in row]
    ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  return _save(fig, path, title)


def _save(fig, path: str, title: str) -> str:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def plot_adaptation(curves: Mapping[str, np.ndarray], accuracies: Mapping[str, Sequence[float]],
                    path: str, title: str = "") -> str:
  """Mean adaptation loss per step for each method, and final accuracy with 95% CI; PNG."""
  fig, (left, right) = _figure(10, 3.8, 2)
  for name, curve in curves.items():
    if curve is not None and len(curve):
      left.plot(np.arange(1, len(curve) + 1), curve, label=name)
  left.set_xlabel("adaptation step")
  left.set_ylabel("training loss (mean over tasks)")
  left.grid(alpha=0.3)
  if left.lines:
    left.legend(fontsize=8)
  names = list(accuracies)
  means = [100 * np.mean(accuracies[n]) for n in names]
  errors = [100 * mean_confidence_interval(accuracies[n])[1] for n in names]
  right.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
  right.set_xticks(range(len(names)))
  right.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  right.set_ylabel("accuracy (%), 95% CI")
  low = max(0.0, min(m - e for m, e in zip(means, errors)) - 5) if names else 0.0
  right.set_ylim(low, 100)
  right.grid(alpha=0.3, axis="y")
  return _save(fig, path, title)


def headroom(backprop: Sequence[float], zero_shot: Sequence[float], *, margin: float = 0.03
             ) -> dict:
  """Whether a task leaves room to adapt: backprop beats zero-shot by ``margin``, interval > 0.

  ``backprop[i]`` and ``zero_shot[i]`` are accuracies of the same replicate (seed); the interval
  is the Student-t 95% interval of the paired differences. A task that fails this says nothing
  about forward gradients, whatever they score on it.

  Returns:
    ``{"gap", "ci95", "meets"}`` (accuracy fractions).
  """
  diffs = np.asarray(backprop, np.float64) - np.asarray(zero_shot, np.float64)
  if diffs.ndim != 1 or diffs.size < 2:
    raise ValueError("headroom needs paired accuracies of at least 2 replicates, got "
                     f"{diffs.size}.")
  gap, half = mean_confidence_interval(diffs)
  return {"gap": gap, "ci95": half, "meets": bool(gap >= margin and gap - half > 0)}


def summarize(accuracies: Sequence[float]) -> dict:
  """Mean accuracy, its 95% CI half-width and the number of tasks."""
  mean, ci95 = mean_confidence_interval(accuracies)
  return {"accuracy": mean, "ci95": ci95, "tasks": len(accuracies)}


def results_table(results: Mapping[str, Mapping[str, float]], reference: Optional[str] = None
                  ) -> str:
  """A markdown table of per-method results (accuracy in %, ± 95% CI).

  Args:
    results: method name -> dict with ``accuracy``, ``ci95``, ``tasks`` and optionally
      ``precision``, ``seconds_per_task``; a row with ``diverged`` (and ``step``, ``task``) is
      shown as diverged instead of an accuracy.
    reference: a method to report differences against (for example ``"backprop"``).
  """
  header = ["method", "precision", "accuracy (%)", "tasks", "s/task"]
  if reference in results:
    header.insert(3, f"vs {reference}")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  reference_ok = reference in results and not results[reference].get("diverged")
  for name, row in results.items():
    if row.get("diverged"):
      cells = [name, str(row.get("precision", "")),
               f"DIVERGED (step {row['step']} of task {row['task']})"]
      if reference in results:
        cells.append("")
      cells += [str(row.get("tasks", 0)), ""]
      lines.append("| " + " | ".join(cells) + " |")
      continue
    cells = [name, str(row.get("precision", "")),
             f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f}"]
    if reference in results:
      cells.append(f"{100 * (row['accuracy'] - results[reference]['accuracy']):+.2f}"
                   if reference_ok else "")
    cells += [str(row["tasks"]), f"{row.get('seconds_per_task', float('nan')):.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def tuning_choice(results: Mapping[str, Mapping], points: Mapping[str, Sequence]) -> dict:
  """The best point of each method's tuning grid: ``{method: {"variant", "point", "accuracy"}}``.

  Args:
    results: a tuning run's results (validation accuracies), keyed by variant name.
    points: ``{method: [(variant name, {field: value}), ...]}``
      (:func:`fwdgrad.experiment.tune_points`). A diverged variant never wins; ties go to the
      earlier point of the grid.
  """
  chosen = {}
  for name, variants in points.items():
    best = None
    for variant, point in variants:
      row = results.get(variant)
      if row is None or row.get("diverged"):
        continue
      if best is None or row["accuracy"] > best["accuracy"]:
        best = {"variant": variant, "point": dict(point), "accuracy": row["accuracy"]}
    if best is not None:
      chosen[name] = best
  return chosen


def tuning_table(results: Mapping[str, Mapping], points: Mapping[str, Sequence]) -> str:
  """A markdown table of every grid point's validation accuracy, the chosen one in bold."""
  chosen = tuning_choice(results, points)
  lines = ["| method | grid point | validation accuracy (%) | chosen |", "|---|---|---|---|"]
  for name, variants in points.items():
    for variant, point in variants:
      row = results.get(variant, {})
      where = ", ".join(f"{field}={value:g}" if isinstance(value, float) else f"{field}={value}"
                        for field, value in point.items())
      if row.get("diverged"):
        value = f"DIVERGED (step {row['step']} of task {row['task']})"
      elif "accuracy" in row:
        value = f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f}"
      else:
        value = "-"
      mark = "**yes**" if chosen.get(name, {}).get("variant") == variant else ""
      lines.append(f"| {name} | {where} | {value} | {mark} |")
  return "\n".join(lines)


def forward_calls(method: Mapping, steps: int) -> str:
  """What one task's adaptation by ``method`` (a method config's fields) costs in model calls.

  jvp calls for FF (a forward pass carrying a tangent, m per step); two forwards per direction
  for sign-m-SPSA / QZO-FF, two more per step for the sharpness-aware ascent; a forward and a
  backward pass per step for backprop.
  """
  kind = method.get("kind")
  m = method.get("num_directions", 3)
  if kind == "zero_shot":
    return "0"
  if kind == "backprop":
    return f"{steps} fwd + {steps} bwd"
  if kind == "ff":
    return f"{steps * m} jvp"
  per_step = 2 * m + (2 if method.get("sharpness_radius") else 0)
  return f"{steps * per_step} fwd"
