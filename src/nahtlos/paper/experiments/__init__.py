"""The paper's experiment grids, end to end: data, training, evaluation, tables, figures.

:func:`reproduce` runs the normalization grid of the paper (Buglakova et al., "Tiling
artifacts and trade-offs of feature normalization in the segmentation of large biological
images") on the synthetic datasets of :mod:`nahtlos.paper.synth`:

* **Table 1** (U-Net): BatchNorm with global and with tile-wise input normalization,
  InstanceNorm with global and tile-wise input normalization, BatchRenorm and Identity
  (global input normalization), for each dataset;
* **Table 2** (UNETR): BatchNorm, InstanceNorm, BatchRenorm, Identity;
* per cell: eval-mode and train-mode Dice per class (median over the validation images),
  train/eval disparity and tile mismatch (the indicator, "no" when seamless, and the
  magnitude per class) — :mod:`nahtlos.analysis.metrics` definitions;
* **transfer** (supplementary Table 1): the U-Net models trained on plants evaluated on
  embryo and vice versa;
* **tile-size sweep** (Fig. 6): eval-mode Dice against the inference window, one line per
  norm;
* **stitched predictions** (Fig. 2): one validation image per dataset predicted by every
  U-Net, with the difference between two tilings, so seams show where they exist;
* **whole-image statistics** (issue 9): the InstanceNorm U-Nets predicted tile-wise and
  with their norms frozen to exact whole-image statistics
  (:func:`nahtlos.engine.global_stats.compute_global_stats`).

The modules, in the order a run uses them: :mod:`.presets` (what a run is: columns,
presets, cells), :mod:`.inputs` (data files and geometry the cells share),
:mod:`.cell_training`, :mod:`.evaluation` and :mod:`.studies` (one cell's training,
numbers and studies), :mod:`.cells` (one cell end to end), :mod:`.tables` and
:mod:`.figures` (a run's outputs) and :mod:`.runner` (:func:`reproduce`).

A run writes into one folder::

    manifest.json              the preset, the grid geometry (halo, blocks) and nahtlos version
    data/<dataset>/            train-<i>.tif, val-<i>.tif and their label files
    cells/<cell>/train/        the training run (nahtlos.training.loop: checkpoints, logs, curves)
    cells/<cell>/result.json   the cell's numbers; its presence means "cell done"
    cells/<cell>/stitched.npz  arrays of the stitched-prediction figure
    results.csv  sweep.csv  global_stats.csv      every number, one row per evaluation
    tables.md                  the tables in the paper's layout
    sweep.png  stitched-<dataset>.png             the figures

**Resume.** A cell is done when its ``result.json`` exists with the fingerprint of the
preset; a re-run skips it. An interrupted training continues from its last checkpoint
(bit-identical on CPU with the same thread count, see :mod:`nahtlos.training.loop`), and the
tables are always rebuilt from the result files, so an interrupted and resumed run gives
the same tables as one that was never interrupted.

Two presets: ``quick`` (2D, small networks, the whole grid in well under an hour on two
CPU cores) and ``paper`` (the paper's 3D sizes: patches of 96³, 25 000 optimizer steps of
1 x 8 accumulated patches; meant for GPUs).
"""

from .presets import (
    PRESETS,
    TABLE1_NORMS,
    TABLE2_NORMS,
    ArchPreset,
    Cell,
    ExperimentError,
    Preset,
    grid,
    shared_training,
)
from .runner import ReproduceResult, reproduce, reproduce_seeds
from .tables import read_csv, result_rows, tables_markdown, write_csv

__all__ = [
    "PRESETS",
    "TABLE1_NORMS",
    "TABLE2_NORMS",
    "ArchPreset",
    "Cell",
    "ExperimentError",
    "Preset",
    "ReproduceResult",
    "grid",
    "read_csv",
    "reproduce",
    "reproduce_seeds",
    "result_rows",
    "shared_training",
    "tables_markdown",
    "write_csv",
]
