"""Worker data sources (grid_ipfs.sources): CSV exports, folders of images, the operator's loader.

The unit tests read real files written here; the last test runs one job on real daemons whose four
workers read their data four ways (an .npz shard, a CSV file, a folder of PNGs, a loader function).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from grid_ipfs import data
from grid_ipfs.chain import verify_chain, walk
from grid_ipfs.data import DataError
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.rpc import IPFSClient
from grid_ipfs.localgrid import LocalGrid
from grid_ipfs.sources import Arrays, ImageFolder, Loader, open_data, read_csv
from grid_ipfs.worker import JoinedJob, Worker

from .cli import run_cli

IMAGES = (None, 8, 8, 1)  # the digits as 8x8 grayscale images
FLAT = (None, 64)


def pixels(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits as uint8 8x8 images and their labels: what a PNG can hold exactly."""
    x, y, _, _ = data.digits(seed=seed)
    return np.round(x[:n] * 255).astype(np.uint8).reshape(-1, 8, 8), y[:n]


def write_csv(path, x: np.ndarray, y: np.ndarray, label: str = "label") -> None:
    columns = [f"p{i}" for i in range(x.shape[1])]
    rows = [",".join([label, *columns])] + [",".join([str(t), *map(str, row)]) for row, t in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")


def write_images(root, images: np.ndarray, labels: np.ndarray, mode: str = "L") -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert(mode).save(folder / f"{i:04d}.png")


# -- CSV --------------------------------------------------------------------------------------------------


def test_a_csv_export_gives_float_features_and_integer_classes_reshaped_to_the_model(tmp_path):
    images, labels = pixels()
    write_csv(tmp_path / "t.csv", images.reshape(len(images), -1), labels)
    source = open_data(tmp_path / "t.csv", label_column="label")
    x, y = source.fit_to(FLAT)
    assert x.dtype == np.float32 and x.shape == (40, 64) and y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    x8, _ = source.fit_to(IMAGES)  # 64 columns fit an 8x8x1 image input
    np.testing.assert_array_equal(x8[..., 0], images)
    assert "40 examples" in source.description


def test_csv_labels_with_fractions_are_regression_targets_and_the_label_may_be_any_column(tmp_path):
    (tmp_path / "r.csv").write_text("\ufeffa, target ,b\n1,0.5,2\n3,1.25,4\n")  # BOM, spaces in the header
    x, y = read_csv(tmp_path / "r.csv", "target").fit_to((None, 2))
    np.testing.assert_array_equal(x, [[1, 2], [3, 4]])
    assert y.dtype == np.float32 and list(y) == [0.5, 1.25]


@pytest.mark.parametrize("text, label, message", [
    ("", "y", "the file is empty"),
    ("a,y\n", "y", "no examples"),
    ("a,b\n1,2\n", "y", "no column 'y' for --label-column (columns: 'a', 'b')"),
    ("a,y,y\n1,2,3\n", "y", "column 'y' appears 2 times"),
    ("y\n1\n", "y", "no feature columns besides the label 'y'"),
    ("a,y\n1,2\n3\n", "y", "row 3 has 1 cells, the header 2"),
    ("a,y\n1,2\ncat,3\n", "y", "row 3, column 'a': 'cat' is not a number"),
    ("a,y\n1,\n", "y", "row 2, column 'y': '' is not a number"),
    ("a,y\n1,nan\n", "y", "row 2, column 'y': not a finite number"),
    ("a,y\n1e999,1\n", "y", "row 2, column 'a': not a finite number"),
    ("a,y\n<script>,1\n", "y", "'<script>' is not a number"),
])
def test_a_bad_csv_is_one_error_naming_the_row_and_column(tmp_path, text, label, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.") + ": ") as caught:
        read_csv(path, label)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_csv_features_that_do_not_fit_the_model_are_named(tmp_path):
    write_csv(tmp_path / "t.csv", np.zeros((3, 10)), np.zeros(3, int))
    with pytest.raises(DataError, match=r"10 feature columns \('p0', 'p1'.* but the model expects "
                                        r"\(64,\)"):
        read_csv(tmp_path / "t.csv", "label").fit_to(FLAT)


def test_binary_and_undecodable_csv_files_are_data_errors(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"a,y\n\xff\xfe\x00\x81,1\n")
    with pytest.raises(DataError, match="cannot read as CSV"):
        read_csv(path, "y")


# -- folders of images -------------------------------------------------------------------------------------


def test_a_folder_of_images_is_loaded_at_the_model_s_size_and_channels(tmp_path):
    images, labels = pixels()
    write_images(tmp_path / "imgs", images, labels)
    folder = ImageFolder(tmp_path / "imgs")
    assert folder.description.endswith(f"40 images in {len(set(labels))} classes")
    x, y = folder.fit_to(IMAGES)
    assert x.shape == (40, 8, 8, 1) and x.dtype == np.float32
    classes = sorted(f"class{k}" for k in set(labels))  # labels are sorted-folder indices
    expected = sorted(zip([classes.index(f"class{k}") for k in labels], images.tolist()))
    assert sorted(zip(y.tolist(), x[..., 0].astype(np.uint8).tolist())) == expected
    rgb, _ = folder.fit_to((None, 4, 4, 3))  # resized, three channels
    assert rgb.shape == (40, 4, 4, 3)


def test_class_names_fix_the_label_order_and_must_match_the_folders(tmp_path):
    images, labels = pixels(12)
    write_images(tmp_path / "imgs", images, labels)
    names = sorted({f"class{k}" for k in labels}, reverse=True)  # the last folder is class 0
    _, y = ImageFolder(tmp_path / "imgs", class_names=names).fit_to(IMAGES)
    for index, name in enumerate(names):
        assert list(y).count(index) == sum(1 for k in labels if f"class{k}" == name)
    with pytest.raises(DataError, match="do not match its class folders"):
        ImageFolder(tmp_path / "imgs", class_names=["cats", "dogs"])


@pytest.mark.parametrize("shape", [FLAT, (None, 8, 8, 2), (None, None, None, 3), (None, 8, 8)])
def test_a_folder_of_images_refuses_a_model_whose_input_is_not_an_image(tmp_path, shape):
    images, labels = pixels(4)
    write_images(tmp_path / "imgs", images, labels)
    with pytest.raises(DataError, match=r"fits a model whose input is \(height, width, channels\)"):
        ImageFolder(tmp_path / "imgs").fit_to(shape)


def test_a_stranger_s_huge_input_size_is_refused_before_anything_is_loaded(tmp_path):
    images, labels = pixels(4)
    write_images(tmp_path / "imgs", images, labels)
    with pytest.raises(DataError, match=r"would take .* GiB, over the 2 GiB limit"):
        ImageFolder(tmp_path / "imgs").fit_to((None, 20000, 20000, 3))


def test_empty_folders_corrupt_images_and_stray_files(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="one sub-folder of images per class, found none"):
        ImageFolder(tmp_path / "none")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "noimg")
    images, labels = pixels(4)
    write_images(tmp_path / "imgs", images, labels)
    (tmp_path / "imgs" / f"class{labels[0]}" / "README.txt").write_text("skipped: not an image")
    assert len(ImageFolder(tmp_path / "imgs").fit_to(IMAGES)[0]) == 4
    (tmp_path / "imgs" / f"class{labels[0]}" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot read its images") as caught:
        ImageFolder(tmp_path / "imgs").fit_to(IMAGES)
    assert "\n" not in str(caught.value)


# -- the operator's loader ----------------------------------------------------------------------------------


def write_loader(tmp_path, body: str) -> str:
    (tmp_path / "my_loader.py").write_text(textwrap.dedent(body))
    return f"{tmp_path / 'my_loader.py'}:load"


def test_a_loader_returning_arrays_is_called_once(tmp_path):
    spec = write_loader(tmp_path, """
        import numpy as np
        calls = []
        def load():
            calls.append(1)
            return np.ones((5, 64), np.float32), np.arange(5)
    """)
    loader = Loader(spec)
    assert loader.fit_to(FLAT)[0].shape == (5, 64) and loader.fit_to(IMAGES)[0].shape == (5, 8, 8, 1)
    assert len(loader.function.__globals__["calls"]) == 1 and "5 examples" in loader.description


def test_a_loader_taking_input_shape_sizes_its_data_for_each_model(tmp_path):
    loader = Loader(write_loader(tmp_path, """
        import numpy as np
        calls = []
        def load(input_shape):
            calls.append(input_shape)
            return np.zeros((3, *input_shape[1:]), np.float32), np.zeros(3)
    """))
    assert loader.fit_to((None, 5, 5, 3))[0].shape == (3, 5, 5, 3)
    assert loader.fit_to((None, 5, 5, 3))[0].shape == (3, 5, 5, 3)  # another job of that input: not reloaded
    assert loader.fit_to((None, 7))[0].shape == (3, 7)
    assert loader.function.__globals__["calls"] == [(None, 5, 5, 3), (None, 7)]


def test_a_loader_may_return_a_dataset_of_examples_or_a_generator_of_batches(tmp_path):
    import tensorflow as tf

    x, y = np.arange(40, dtype=np.float32).reshape(10, 4), np.arange(10)
    for body in ("return tf.data.Dataset.from_tensor_slices((x, y))",
                 "return tf.data.Dataset.from_tensor_slices((x, y)).batch(3)",
                 "return ((x[i:i + 4], y[i:i + 4]) for i in range(0, 10, 4))"):
        module = {"tf": tf, "x": x, "y": y}
        exec(f"def load():\n    {body}", module)  # noqa: S102 - the test's own code
        loader = Loader.__new__(Loader)
        loader.spec, loader.function, loader.per_shape = "test:load", module["load"], False
        got_x, got_y = loader._call().fit_to((None, 4))
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)


@pytest.mark.parametrize("body, message", [
    ("def load():\n    raise RuntimeError('no database')", "failed: RuntimeError: no database"),
    ("def load():\n    raise RuntimeError('no database\\n  at host db1\\n')",
     "failed: RuntimeError: no database at host db1"),
    ("def load():\n    return 'x'", "returned str; expected (x, y) arrays"),
    ("def load():\n    return [(1, 2, 3)]", "batch 0 is a tuple, expected an (x, y) pair"),
    ("import numpy as np\ndef load():\n    return np.zeros((3, 2)), np.zeros(4)", "x has 3 examples and y 4"),
    ("import numpy as np\ndef load():\n    return np.array(['a']), np.zeros(1)", "expected numbers"),
    ("def load():\n    return iter([])", "no examples"),
    ("load = 3", "has no function load"),
    ("raise ImportError('missing dependency')", "cannot import"),
])
def test_a_loader_that_misbehaves_is_one_data_error(tmp_path, body, message):
    with pytest.raises(DataError, match="^--data-loader ") as caught:
        Loader(write_loader(tmp_path, body))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("spec", ["nocolon", ":load", "mod:", "mod:not-a-name", "missing.py:load"])
def test_a_malformed_loader_spec_is_refused(spec):
    with pytest.raises(DataError, match="--data-loader"):
        Loader(spec)


# -- which source --data names, and the worker's command line ----------------------------------------------


def test_open_data_picks_the_source_from_the_path_and_refuses_misplaced_options(tmp_path):
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    data.save_shard(tmp_path / "s.npz", x, y)
    assert isinstance(open_data(tmp_path / "s.npz"), Arrays)
    with pytest.raises(DataError, match="--label-column is for CSV files"):
        open_data(tmp_path / "s.npz", label_column="y")
    with pytest.raises(DataError, match="a CSV file needs --label-column NAME"):
        open_data(tmp_path / "t.csv")
    with pytest.raises(DataError, match="--class-names is for folders of images"):
        open_data(tmp_path / "s.npz", class_names=["a"])
    with pytest.raises(DataError, match="not found .*expected an .npz shard, a .csv file"):
        open_data(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"data x has feature shape \(64,\) but the model expects \(10,\)"):
        open_data(tmp_path / "s.npz").fit_to((None, 10))


def offline_worker(x: np.ndarray, y: np.ndarray) -> Worker:
    """A worker that is never run: only its data handling is exercised (no daemon is contacted)."""
    return Worker(IPFSClient("/ip4/127.0.0.1/tcp/9"), Identity.generate(), (x, y))


def join(worker: Worker, job: str, input_shape: tuple) -> JoinedJob:
    """What joining a job does with our data: fit it to the model's input, split it, hold the split."""
    joined = JoinedJob(job, None, worker.split(worker.fit_data(worker.data, input_shape)))
    worker.jobs[job] = joined
    return joined


def test_jobs_whose_models_share_an_input_share_one_split_of_our_examples():
    x, y = data.digits()[:2]
    worker = offline_worker(x, y)  # (n, 64) features, reshaped for every (8, 8, 1) job
    splits = [join(worker, f"cnn-{i}", IMAGES).split for i in range(6)] + [join(worker, "mlp", FLAT).split]
    assert all(s is splits[0] for s in splits[:6])  # one copy for six jobs, not six copies
    assert splits[0].x_train.shape[1:] == (8, 8, 1) and splits[6].x_train.shape[1:] == (64,)
    assert np.array_equal(splits[0].x_train.reshape(-1, 64), splits[6].x_train)  # the same split


def test_strangers_jobs_with_ever_new_input_shapes_cannot_make_a_worker_hold_unbounded_copies(monkeypatch):
    from grid_ipfs import worker as worker_module

    x, y = data.digits()[:2]
    worker = offline_worker(x, y)
    one_copy = x.nbytes + y.nbytes
    monkeypatch.setattr(worker_module, "MAX_HELD_DATA_BYTES", 2 * one_copy)
    join(worker, "flat", FLAT)
    join(worker, "images", IMAGES)  # a second shape: two copies, at the limit
    with pytest.raises(DataError, match=r"beside the .* MiB held for 2 joined job\(s\), over the .* limit"):
        worker.fit_data(worker.data, (None, 64, 1))  # a third shape: refused
    assert join(worker, "images-again", IMAGES).split is worker.jobs["images"].split  # held: free
    del worker.jobs["flat"], worker.jobs["images"], worker.jobs["images-again"]
    assert join(worker, "seq", (None, 64, 1)).split.x_train.shape[1:] == (64, 1)  # room again once they end


def test_a_job_whose_images_would_not_fit_beside_the_held_ones_is_refused_before_decoding(tmp_path, monkeypatch):
    """Each new image size decodes the whole folder: a job that will be refused for memory must not."""
    from grid_ipfs import worker as worker_module

    write_images(tmp_path / "folder", *pixels(12))
    folder = ImageFolder(tmp_path / "folder")
    worker = Worker(IPFSClient("/ip4/127.0.0.1/tcp/9"), Identity.generate(), folder)
    loads = []
    real_load = folder._load
    monkeypatch.setattr(folder, "_load", lambda *dims: loads.append(dims) or real_load(*dims))
    join(worker, "small", IMAGES)
    monkeypatch.setattr(worker_module, "MAX_HELD_DATA_BYTES", 2 * folder.nbytes_at(IMAGES))
    with pytest.raises(DataError, match="over the .* limit"):
        worker.fit_data(folder, (None, 16, 16, 1))
    assert loads == [(8, 8, 1)]  # the 16x16 job was refused on its estimate, not after a load
    assert folder.nbytes_at(IMAGES) >= sum(a.nbytes for a in worker.jobs["small"].split)


def test_a_first_job_is_never_refused_for_the_size_of_our_examples(monkeypatch):
    from grid_ipfs import worker as worker_module

    x, y = data.digits()[:2]
    monkeypatch.setattr(worker_module, "MAX_HELD_DATA_BYTES", 1)
    assert len(join(offline_worker(x, y), "only", FLAT).split.x_train) > 0


def test_the_worker_command_line_says_what_is_wrong_with_its_data(tmp_path):
    write_csv(tmp_path / "t.csv", np.zeros((3, 4)), np.zeros(3, int))
    api = "/ip4/127.0.0.1/tcp/9"  # nothing is contacted: the data is read first
    proc = run_cli("grid_ipfs.worker", "--api", api, "--data", str(tmp_path / "t.csv"), timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 't.csv'}: a CSV file needs --label-column NAME (the column holding the labels)"
    proc = run_cli("grid_ipfs.worker", "--api", api, timeout=120)
    assert proc.returncode == 2 and "give one of --data PATH or --data-loader MODULE:FUNCTION" in proc.stderr


# -- one job, four kinds of data, on real daemons ----------------------------------------------------------


def image_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(IMAGES[1:]), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


@pytest.mark.integration
def test_one_job_trains_on_a_shard_a_csv_a_folder_of_images_and_a_loader(tmp_path):
    x, y, x_test, y_test = data.digits()
    images = np.round(x * 255).astype(np.uint8).reshape(-1, 8, 8)
    parts = data.split_iid(images, y, 4, seed=0)
    root = tmp_path
    data.save_shard(root / "s0.npz", parts[0][0][..., None].astype(np.float32), parts[0][1])
    write_csv(root / "s1.csv", parts[1][0].reshape(len(parts[1][0]), -1), parts[1][1], label="digit")
    write_images(root / "s2", parts[2][0], parts[2][1])
    np.savez(root / "s3-arrays.npz", x=parts[3][0], y=parts[3][1])
    (root / "loader.py").write_text(textwrap.dedent(f"""
        import numpy as np
        def load(input_shape):  # sized for each model, as a loader of images would be
            arrays = np.load({str(root / 's3-arrays.npz')!r})
            return arrays["x"].reshape(-1, *input_shape[1:]).astype(np.float32), arrays["y"]
    """))
    data.save_shard(root / "test.npz", np.round(x_test * 255).reshape(-1, 8, 8, 1).astype(np.float32), y_test)
    image_model().save(root / "images.keras")
    # folder names sort as class0..class9, the digits' own order
    local = LocalGrid(root / "grid", [root / "s0.npz"], nodes=3)
    try:
        local.start()
        local.add_worker(root / "s1.csv", ["--label-column", "digit"])
        local.add_worker(root / "s2")
        local.add_worker(None, ["--data-loader", f"{root / 'loader.py'}:load"])
        proc = run_cli("grid_ipfs.client", "submit", "--api", local.apis[0], "--model", str(root / "images.keras"),
                       "--rounds", "3", "--min-workers", "4", "--epochs", "2", "--batch-size", "32",
                       "--eval-data", str(root / "test.npz"), "--key", str(root / "client.key"),
                       "--head-dir", str(root / "heads"), "--job", "four-sources", "--json", timeout=500)
        logs = "\n".join(f"--- worker{i}\n{local.worker_log(i)[-2000:]}" for i in range(4))
        assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{logs}"
        result = json.loads(proc.stdout)
        with local.client(2) as reader:
            blocks = [block for _, block in walk(reader, result["head"])]
            assert verify_chain(reader, result["head"]).ok
        trained_on = sorted(len(part[1]) - round(0.1 * len(part[1])) for part in parts)  # --val-split 0.1
        assert [b["round"] for b in blocks] == [3, 2, 1, 0]
        for block in blocks[:-1]:
            assert sorted(u["num_examples"] for u in block["updates"]) == trained_on, block["updates"]
        assert result["rounds"][-1]["metrics"]["val_accuracy"] >= 0.85, result["rounds"]
        assert "data " in local.worker_log(2) and "images in 10 classes" in local.worker_log(2)
    finally:
        local.stop()
