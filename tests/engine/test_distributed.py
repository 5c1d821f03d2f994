from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from conftest import make_unet
from nahtlos import open_image, predict_blockwise, predict_file, predict_whole, save_image
from nahtlos.cli import app
from nahtlos.errors import BlockFailedError, IncompleteOutputError, SettingsError
from nahtlos.io import InputNormalization, PredictionStore, open_source, streaming_percentiles
from nahtlos.nets.checkpoint import LoadedModel, load_model, save_torchscript

# Test-local modules travel to the Dask workers by value (the workers cannot import tests/).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BLOCK, HALO, ALIGN = (8, 12, 12), 12, 4
SHAPE = (20, 28, 24)
runner = CliRunner()
# The tests that use the cluster run on one pytest-xdist worker (``--dist loadgroup``), so
# that only one cluster is started.
on_cluster = pytest.mark.xdist_group("dask-cluster")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "unet.pt"
    save_torchscript(
        make_unet(3, 2), path, example=torch.zeros(1, 1, 16, 16, 16), metadata={"ndim": 3}
    )
    return path


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A uint16 OME-Zarr 0.5 volume with anisotropic pixels, chunked unlike the blocks."""
    data = np.random.default_rng(7).integers(100, 4000, SHAPE).astype(np.uint16)
    path = tmp_path_factory.mktemp("input") / "volume.zarr"
    save_image(path, data, axes="zyx", scale=(2.0, 0.5, 0.5), units=("micrometer",) * 3)
    return path, data


@pytest.fixture(scope="module")
def client():
    """One LocalCluster with 2 worker processes, shared by the Dask tests (startup is the cost)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _levels(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open(path, mode="r")
    if isinstance(group, zarr.Array):  # a plain .zarr output
        return {"s0": np.asarray(group[...])}
    arrays = {}
    for name in ("s0", "s1", "labels/argmax/s0", "labels/c0/s0", "labels/c1/s0"):
        if name in group:
            arrays[name] = np.asarray(group[name][...])
    return arrays


def _assert_identical(a: Path, b: Path) -> None:
    la, lb = _levels(a), _levels(b)
    assert la.keys() == lb.keys() and la
    for name in la:
        assert la[name].dtype == lb[name].dtype, name
        np.testing.assert_array_equal(la[name], lb[name], err_msg=name)


def test_zarr_to_zarr_equals_in_memory(model_file, volume, tmp_path):
    path, data = volume
    norm = InputNormalization("global")
    out = tmp_path / "pred.ome.zarr"
    report = predict_file(
        model_file,
        path,
        out,
        BLOCK,
        HALO,
        ALIGN,
        batch_size=2,
        activation="sigmoid",
        normalization=norm,
        max_windows=6,
        progress=False,
    )
    assert report.predicted == report.blocks == 18 and report.skipped == 0
    assert report.stats.windows_in_flight_max <= 6
    # the in-memory peer: the whole volume as a numpy array, percentiles on it
    net = load_model(model_file).module
    ref_norm = InputNormalization("global").fit(data)
    expected = predict_blockwise(
        net,
        data,
        BLOCK,
        HALO,
        ALIGN,
        batch_size=2,
        input_transform=ref_norm,
        output_transform=torch.sigmoid,
        progress=False,
    )
    got = open_source(out)
    np.testing.assert_array_equal(np.asarray(got.array[...]), expected)
    whole = predict_whole(
        net, data, HALO, ALIGN, input_transform=ref_norm, output_transform=torch.sigmoid
    )
    np.testing.assert_allclose(expected, whole, atol=1e-5)
    # axes and physical scale travel from input to output
    assert got.axes == ("c", "z", "y", "x") and got.scale == (1.0, 2.0, 0.5, 0.5)
    assert zarr.open_group(out, mode="r")["s0"].chunks == (2, *BLOCK)
    # the global percentiles are cached with the output, exact for integer images
    cached = PredictionStore.open(out, mode="r").plan["normalization"]["values"]
    np.testing.assert_array_equal(cached[0], streaming_percentiles(data, (1.0, 99.8)))
    np.testing.assert_array_equal(cached[0], np.percentile(data, (1.0, 99.8)))


@on_cluster
def test_dask_local_cluster_equals_in_process(client, model_file, volume, tmp_path):
    path, _ = volume
    common = dict(
        batch_size=2,
        activation="softmax",
        output_dtype="float16",
        segmentation="argmax",
        pyramid_levels=1,
        progress=False,
    )
    local = predict_file(
        model_file, path, tmp_path / "local.ome.zarr", BLOCK, HALO, ALIGN, **common
    )
    dask = predict_file(
        model_file, path, tmp_path / "dask.ome.zarr", BLOCK, HALO, ALIGN, scheduler=client, **common
    )
    assert dask.scheduler.startswith("tcp://") and dask.predicted == local.predicted == 18
    _assert_identical(tmp_path / "local.ome.zarr", tmp_path / "dask.ome.zarr")
    # each worker process loaded the TorchScript file at most once, for all its tasks
    loads = client.run(
        lambda: (
            __import__("nahtlos.engine.cluster").engine.cluster._model_from_file.cache_info().misses
        )
    )
    assert len(loads) == 2 and all(n <= 1 for n in loads.values()) and sum(loads.values()) >= 1


@on_cluster
def test_dask_with_a_module_scattered_once(client, volume, tmp_path):
    path, data = volume
    torch.manual_seed(3)
    # plain torch layers: the workers unpickle it without importing MONAI
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1)
    ).eval()
    predict_file(
        net, path, tmp_path / "a.zarr", BLOCK, HALO, ALIGN, scheduler=client, progress=False
    )
    expected = predict_blockwise(net, data, BLOCK, HALO, ALIGN, progress=False)
    np.testing.assert_array_equal(open_image(tmp_path / "a.zarr")[...], expected)


class Flaky(torch.nn.Module):
    """A point-wise model that fails ``fails`` times on windows holding a marker value."""

    def __init__(self, counter: str, fails: int) -> None:
        super().__init__()
        self.counter = counter
        self.fails = fails
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.max()) > 500:
            # the count lives on disk: the tries run in different worker processes
            counter = Path(self.counter)
            n = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(n))
            if n <= self.fails:
                raise RuntimeError(f"flaky failure number {n}")
        return x * self.scale


@on_cluster
def test_failed_tasks_are_retried_then_reported_with_their_block(client, tmp_path):
    image = np.ones((12, 16), np.float32)
    image[9, 3] = 1000.0  # inside block (2, 0) of 4x8 blocks
    path = save_image(tmp_path / "img.zarr", image, axes="yx")
    common = dict(block=(4, 8), halo=0, scheduler=client, progress=False)
    # one failure, two retries: the run succeeds and the result is right
    flaky = Flaky(str(tmp_path / "count-a"), fails=1)
    predict_file(flaky, path, tmp_path / "ok.zarr", retries=2, **common)
    np.testing.assert_array_equal(open_image(tmp_path / "ok.zarr")[0], image * 0.5)
    assert (tmp_path / "count-a").read_text() == "2"
    # failing on every try: reported with the block after 1 + retries tries
    always = Flaky(str(tmp_path / "count-b"), fails=10**6)
    with pytest.raises(BlockFailedError, match=r"block \(2, 0\).*flaky failure number 3") as err:
        predict_file(always, path, tmp_path / "bad.zarr", retries=2, **common)
    assert err.value.block == (2, 0)
    assert (tmp_path / "count-b").read_text() == "3"
    with pytest.raises(IncompleteOutputError):
        open_image(tmp_path / "bad.zarr")


class Interrupt(torch.nn.Module):
    """Wraps a model and simulates Ctrl-C on its ``after``-th forward pass."""

    def __init__(self, inner: torch.nn.Module, after: int) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner(x)


def test_ctrl_c_then_resume_is_bit_identical(model_file, volume, tmp_path):
    path, _ = volume
    loaded = load_model(model_file)
    out = tmp_path / "pred.zarr"
    common = dict(batch_size=2, output_dtype="uint8", activation="sigmoid", progress=False)
    interrupted = LoadedModel(Interrupt(loaded.module, after=4), loaded.path, "torchscript")
    with pytest.raises(KeyboardInterrupt):
        predict_file(interrupted, path, out, BLOCK, HALO, ALIGN, **common)
    store = PredictionStore.open(out, mode="r")
    done, total = store.progress()
    assert not store.complete and 0 < done < total
    with pytest.raises(IncompleteOutputError, match=f"{done} of {total}"):
        open_image(out)
    with pytest.raises(SettingsError, match=r"halo=\[12, 12, 12\].*halo=\[8, 8, 8\]"):
        predict_file(loaded, path, out, BLOCK, 8, ALIGN, resume=True, **common)
    report = predict_file(loaded, path, out, BLOCK, HALO, ALIGN, resume=True, **common)
    assert report.skipped == done and report.predicted == total - done
    assert not PredictionStore.blocks_path(out).exists()  # the record of blocks is gone
    predict_file(loaded, path, tmp_path / "ref.zarr", BLOCK, HALO, ALIGN, **common)
    _assert_identical(out, tmp_path / "ref.zarr")
    again = predict_file(loaded, path, out, BLOCK, HALO, ALIGN, resume=True, **common)
    assert again.predicted == 0 and again.scheduler == "already complete"


SLOW_RUN = """
import sys, time
import torch
from nahtlos import predict_file
from nahtlos.nets.checkpoint import LoadedModel, load_model


class Slow(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        time.sleep(0.2)
        return self.inner(x)


if __name__ == "__main__":
    model, image, out = sys.argv[1:4]
    loaded = load_model(model)
    slow = LoadedModel(Slow(loaded.module), loaded.path, loaded.kind, loaded.metadata)
    predict_file(slow, image, out, (8, 12, 12), 12, 4, batch_size=2, device="cpu", progress=False)
"""

CLI_ARGS = ["--block", "8,12,12", "--halo", "12", "--alignment", "4", "--batch-size", "2"]


def _done_blocks(out: Path) -> int:
    try:
        return PredictionStore.open(out, mode="r").progress()[0]
    except Exception:  # not created yet, or being created
        return 0


def test_killed_process_resumes_bit_identical(model_file, volume, tmp_path):
    path, _ = volume
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model_file), str(path), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while _done_blocks(out) < 4:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done, total = PredictionStore.open(out, mode="r").progress()
    assert 4 <= done < total
    # an interrupted output is reported as such, as an input and as an output
    with pytest.raises(IncompleteOutputError):
        open_image(out)
    base = ["predict", str(model_file), str(path)]
    result = runner.invoke(app, [*base, str(out), *CLI_ARGS, "--no-progress"])
    assert result.exit_code == 2 and "interrupted run" in result.output
    result = runner.invoke(app, ["predict", str(model_file), str(out), str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and "incomplete" in result.output
    # resumed by the command line, it ends as an uninterrupted run does, bit for bit
    result = runner.invoke(app, [*base, str(out), *CLI_ARGS, "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{done} of {total} blocks already done" in result.output
    ref = tmp_path / "ref.zarr"
    result = runner.invoke(app, [*base, str(ref), *CLI_ARGS, "--no-progress"])
    assert result.exit_code == 0, result.output
    _assert_identical(out, ref)


@on_cluster
def test_cli_dask_address_and_segmentation(client, model_file, volume, tmp_path):
    path, _ = volume
    out = tmp_path / "cli.ome.zarr"
    args = [
        *CLI_ARGS,
        "--activation",
        "sigmoid",
        "--output-dtype",
        "uint8",
        "--segmentation",
        "threshold",
        "--no-progress",
    ]
    address = client.scheduler.address
    result = runner.invoke(
        app, ["predict", str(model_file), str(path), str(out), *args, "--scheduler", address]
    )
    assert result.exit_code == 0, result.output
    ref = tmp_path / "ref.ome.zarr"
    result = runner.invoke(app, ["predict", str(model_file), str(path), str(ref), *args])
    assert result.exit_code == 0, result.output
    _assert_identical(out, ref)
    assert set(_levels(out)) >= {"labels/c0/s0", "labels/c1/s0"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output-dtype", "uint8"], "activation is 'none'"),
        (["--resume", "--overwrite"], "choose one"),
        (["--workers", "2"], "--scheduler local"),
        (["--scheduler", "udp-nowhere"], "not 'local' or an address"),
        (["--max-windows", "3"], "at least 6"),
    ],
)
def test_cli_settings_errors_leave_nothing(model_file, volume, tmp_path, extra, message):
    path, _ = volume
    out = tmp_path / "o.zarr"
    result = runner.invoke(
        app, ["predict", str(model_file), str(path), str(out), *CLI_ARGS, *extra]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.startswith("nahtlos: error:")
    assert not out.exists()


def test_segmentation_needs_zarr(model_file, volume, tmp_path):
    path, _ = volume
    for name in ("o.npy", "o.zarr"):
        out = tmp_path / name
        args = [
            *("predict", str(model_file), str(path), str(out), *CLI_ARGS),
            *("--segmentation", "argmax"),
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "name the output o.ome.zarr" in result.output
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_cli_starts_a_local_cluster(model_file, volume, tmp_path):
    path, _ = volume
    base = ["predict", str(model_file), str(path)]
    out, ref = tmp_path / "local.zarr", tmp_path / "ref.zarr"
    result = runner.invoke(
        app, [*base, str(out), *CLI_ARGS, "--scheduler", "local", "--workers", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*base, str(ref), *CLI_ARGS, "--no-progress"]).exit_code == 0
    _assert_identical(out, ref)
