"""metalab-export format=onnx: the graphs onnxruntime runs give what the Python API gives, on real
Omniglot images, for any episode shape from one file; bad settings get one line before any work."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_checkpoints import omniglot_folders, trained_checkpoint
from test_metric_learners import configured

import metalab
from metalab.algorithms import ALGORITHMS
from metalab.api import ImageTransform, Learner
from metalab.export import main
from metalab.onnx_graph import export_learner

onnxruntime = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "scripts" / "onnx_example.py"
PRETRAINED = "pretrained:protonet-omniglot"
# onnxruntime's float32 kernels against torch's: logits equal to this, relative to the largest.
TOLERANCE = 1e-4


def close(got: np.ndarray, expected: np.ndarray) -> bool:
    return got.shape == expected.shape and np.abs(got - expected).max() <= TOLERANCE * max(1, np.abs(expected).max())


def session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_episode(graph, learner: Learner, support: dict, queries: list) -> np.ndarray:
    """The episode graph's logits for a {class: files} support set, classes in the dict's order."""
    files = [(f, k) for k, label in enumerate(support) for f in support[label]]
    onehot = np.eye(len(support), dtype=np.float32)[[k for _, k in files]]
    inputs = {
        "support": learner.prepare_inputs([f for f, _ in files], "support").numpy(),
        "support_onehot": onehot,
        "query": learner.prepare_inputs(queries, "query").numpy(),
    }
    return graph.run(["logits"], inputs)[0]


def untrained(tmp_path, data_dir, cache_dir, algorithm: str, *overrides: str) -> Learner:
    """A freshly initialized learner as the application API holds one: the graphs' code paths do
    not depend on training, and building one costs no training time."""
    config = configured(tmp_path, data_dir, cache_dir, algorithm, *overrides)
    torch.manual_seed(0)
    model = ALGORITHMS[algorithm].from_config(config, [1, 28, 28], "classification").eval()
    return Learner(model, ImageTransform([1, 28, 28], invert=True), str(tmp_path / f"{algorithm}.ckpt"))


@pytest.fixture(scope="module")
def protonet_onnx(tmp_path_factory) -> Path:
    """The shipped ProtoNet exported by the command, over an older file (overwrite=true)."""
    output = tmp_path_factory.mktemp("export") / "protonet.onnx"
    output.write_text("an older export\n")
    main([f"ckpt_path={PRETRAINED}", "format=onnx", f"output={output}", "overwrite=true"])
    return output


@pytest.fixture(scope="module")
def pretrained():
    return metalab.load_learner(PRETRAINED)


@pytest.mark.data
@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 15), (20, 5, 5), (3, 2, 1)])
def test_one_protonet_graph_matches_the_api_for_every_episode_shape(
    protonet_onnx, pretrained, omniglot_dir, tmp_path, ways, shots, queries
):
    graph = session(protonet_onnx)
    shapes = {i.name: i.shape for i in [*graph.get_inputs(), *graph.get_outputs()]}
    assert shapes == {
        "support": ["support", 1, 28, 28],
        "support_onehot": ["support", "ways"],
        "query": ["queries", 1, 28, 28],
        "logits": ["queries", "ways"],
    }
    support, truth = omniglot_folders(omniglot_dir, tmp_path, ways, shots, -(-queries // ways), seed=ways)
    items = sorted(truth)[:queries]
    expected = pretrained.adapt(support).predict_logits(items).numpy()
    got = run_episode(graph, pretrained, support, items)
    assert close(got, expected), np.abs(got - expected).max()
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.data
def test_the_metadata_holds_the_transform_and_the_checkpoint(protonet_onnx):
    meta = session(protonet_onnx).get_modelmeta().custom_metadata_map
    shipped = metalab.pretrained.resolve(PRETRAINED)
    assert meta["checkpoint_sha256"] == hashlib.sha256(Path(shipped).read_bytes()).hexdigest()
    assert meta["checkpoint"] == PRETRAINED and meta["learner"] == "protonet" and meta["graph"] == "episode"
    assert meta["metalab_version"] == metalab.__version__
    assert json.loads(meta["input_shape"]) == [1, 28, 28] and meta["layout"] == "NCHW"
    assert (meta["image_mode"], meta["image_size"], meta["invert"]) == ("L", "28", "true")
    assert "Lanczos" in meta["preprocess"] and "255 - value" in meta["preprocess"]
    assert meta["batch_statistics"].startswith("running")


def doc_example() -> str:
    text = (REPO / "docs" / "export.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(block for block in blocks if "onnxruntime.InferenceSession" in block)


@pytest.mark.data
def test_the_documented_example_predicts_as_metalab_without_metalab_or_torch(
    protonet_onnx, pretrained, omniglot_dir, tmp_path
):
    assert doc_example() == EXAMPLE.read_text()  # the doc shows the very script run here
    support, truth = omniglot_folders(omniglot_dir, tmp_path, classes=5, shots=1, queries=3, seed=3)
    items = sorted(truth)
    # Any import of metalab or torch in the example fails: it runs on onnxruntime, numpy and PIL.
    code = "import runpy, sys; sys.modules.update(metalab=None, torch=None); del sys.argv[0]; "
    code += "runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLE), str(protonet_onnx), str(tmp_path / "support"), *map(str, items)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = pretrained.adapt({label: support[label] for label in sorted(support)}).predict(items)
    assert [row["item"] for row in rows] == [str(item) for item in items]
    for row, prediction in zip(rows, expected):
        assert row["label"] == prediction.label
        assert row["probability"] == pytest.approx(prediction.probability, abs=1e-4)
    assert sum(row["label"] == truth[Path(row["item"])] for row in rows) >= 12  # 15 queries, chance 3


@pytest.mark.data
@pytest.mark.parametrize(
    "algorithm, overrides",
    [("matchingnet", ["algorithm.fce=false"]), ("relationnet", ["algorithm.batch_norm=transductive"])],
)
def test_the_other_metric_learners_export_their_episode(
    algorithm, overrides, tmp_path, data_dir, cache_dir, omniglot_dir
):
    learner = untrained(tmp_path, data_dir, cache_dir, algorithm, *overrides)
    output = tmp_path / f"{algorithm}.onnx"
    metadata, _ = export_learner(learner, output)
    graph = session(output)
    for ways, shots, queries in [(5, 1, 2), (3, 2, 1)]:
        support, truth = omniglot_folders(omniglot_dir, tmp_path / f"{ways}", ways, shots, queries, seed=ways)
        items = sorted(truth)
        expected = learner.adapt(support).predict_logits(items).numpy()
        assert close(run_episode(graph, learner, support, items), expected)
    # Relation Networks with per-pass statistics: a query's output depends on its pass, and the doc says so.
    assert ("depend on the other queries" in metadata["batch_statistics"]) == learner.transductive


@pytest.fixture(scope="module")
def maml_ckpt(tmp_path_factory, data_dir, cache_dir, omniglot_dir) -> Path:
    return trained_checkpoint("maml", tmp_path_factory, data_dir, cache_dir)


@pytest.mark.data
@pytest.mark.filterwarnings("ignore:predicting in a pass of 4")  # fewer queries than classes: on purpose
def test_maml_exports_adapted_to_a_support_folder(maml_ckpt, omniglot_dir, tmp_path):
    support, truth = omniglot_folders(omniglot_dir, tmp_path, classes=5, shots=1, queries=3)
    output = tmp_path / "maml.onnx"
    main([f"ckpt_path={maml_ckpt}", "format=onnx", f"output={output}", f"support={tmp_path / 'support'}"])
    graph = session(output)
    meta = graph.get_modelmeta().custom_metadata_map
    labels = sorted(support)  # the class folders, in order
    assert meta["graph"] == "adapted" and json.loads(meta["labels"]) == labels
    assert [i.name for i in graph.get_inputs()] == ["query"] and graph.get_inputs()[0].shape == ["queries", 1, 28, 28]
    assert "depend on the other queries" in meta["batch_statistics"]  # conv4's BatchNorm: batch statistics
    learner = metalab.load_learner(maml_ckpt)
    task = learner.adapt({label: support[label] for label in labels})
    items = sorted(truth)
    # BatchNorm normalizes each call's images together: the graph matches the API pass for pass.
    for batch in (items, items[:4]):
        query = learner.prepare_inputs(batch, "query").numpy()
        assert close(graph.run(["logits"], {"query": query})[0], task.predict_logits(batch).numpy())
    # independent=True: the support images followed by the one query, the last row kept.
    passes = [
        np.concatenate([task.support_x.numpy(), learner.prepare_inputs([item], "query").numpy()]) for item in items
    ]
    got = np.stack([graph.run(["logits"], {"query": query})[0][-1] for query in passes])
    assert close(got, task.predict_logits(items, independent=True).numpy())


@pytest.mark.data
def test_a_gradient_learner_without_support_is_refused_saying_why(maml_ckpt, tmp_path, capsys):
    output = tmp_path / "maml.onnx"
    with pytest.raises(SystemExit) as exit_:
        main([f"ckpt_path={maml_ckpt}", "format=onnx", f"output={output}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "torch.autograd.grad" in err and "support=" in err and not output.exists()


def test_matching_networks_with_fce_are_refused_an_episode_graph(tmp_path, data_dir, cache_dir):
    learner = untrained(tmp_path, data_dir, cache_dir, "matchingnet", "algorithm.fce=true")
    with pytest.raises(metalab.errors.ConfigError, match="LSTM.*support="):
        export_learner(learner, tmp_path / "fce.onnx")
    assert not (tmp_path / "fce.onnx").exists()


def test_a_graph_that_would_fix_the_image_counts_is_refused_not_written(tmp_path, data_dir, cache_dir, monkeypatch):
    # vmap's batching rules fix traced sizes (inner_loop.map_tasks loops instead while exporting):
    # with vmap back, the export must stop rather than write a graph for the traced sizes only.
    from torch.func import vmap

    learner = untrained(tmp_path, data_dir, cache_dir, "protonet", "algorithm.batch_norm=transductive")
    monkeypatch.setattr("metalab.algorithms.metric.map_tasks", lambda module, x: vmap(module)(x))
    with pytest.raises(metalab.errors.ConfigError, match="does not trace with free image counts"):
        export_learner(learner, tmp_path / "fixed.onnx")
    assert not (tmp_path / "fixed.onnx").exists()


def bad_settings(tmp_path: Path) -> list[tuple[str, list[str], str]]:
    """(case, arguments, text the message must hold)."""
    existing = tmp_path / "existing.onnx"
    good = [f"ckpt_path={PRETRAINED}", "format=onnx"]
    return [
        (
            "unknown format",
            [f"ckpt_path={PRETRAINED}", "format=tflite", f"output={tmp_path / 'a.onnx'}"],
            "format=tflite",
        ),
        ("missing folder", [*good, f"output={tmp_path / 'no' / 'a.onnx'}"], f"{tmp_path / 'no'} does not exist"),
        ("existing file", [*good, f"output={existing}"], "overwrite=true"),
        ("not .onnx", [*good, f"output={tmp_path / 'a.pt'}"], "must end in .onnx"),
        ("a folder", [*good, f"output={tmp_path / 'dir.onnx'}"], "is a folder"),
        ("unknown checkpoint", ["ckpt_path=pretrained:nope", "format=onnx", f"output={tmp_path / 'a.onnx'}"], "'nope'"),
        (
            "missing file",
            [f"ckpt_path={tmp_path / 'none.ckpt'}", "format=onnx", f"output={tmp_path / 'a.onnx'}"],
            "none.ckpt",
        ),
        ("unknown key", [*good, f"output={tmp_path / 'a.onnx'}", "opset=17"], "'opset=17'"),
        ("bad flag", [*good, f"output={existing}", "overwrite=yes"], "overwrite=yes"),
        ("missing", [f"ckpt_path={PRETRAINED}"], "format=, output= missing"),
        ("bad support", [*good, f"output={tmp_path / 'a.onnx'}", f"support={tmp_path / 'none'}"], "is not a directory"),
    ]


def test_bad_settings_get_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "existing.onnx").write_text("an earlier export\n")
    (tmp_path / "dir.onnx").mkdir()
    monkeypatch.setattr(metalab.api.Learner, "adapt", lambda *a: pytest.fail("adapted despite a bad setting"))
    monkeypatch.setattr("metalab.onnx_graph.export_learner", lambda *a, **k: pytest.fail("exported despite it"))
    for case, args, message in bad_settings(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, case
        assert err.startswith("metalab: error:") and message in err and err.count("\n") == 1, (case, err)
    assert (tmp_path / "existing.onnx").read_text() == "an earlier export\n"  # nothing already written is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "existing.onnx"]


def test_without_the_export_extra_the_message_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit):
        main([f"ckpt_path={PRETRAINED}", "format=onnx", f"output={tmp_path / 'a.onnx'}"])
    assert "onnxruntime, not installed here; pip install 'metalab[export]'" in capsys.readouterr().err


def test_the_module_entry_point_refuses_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metalab.export",
            f"ckpt_path={PRETRAINED}",
            "format=tflite",
            f"output={tmp_path / 'a.onnx'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "format=tflite" in proc.stderr, proc.stderr


# Every other family through its adapted graph; fresh learners, so only the code paths are exercised.
ADAPTED = {
    "anil": ["ways=5"],
    "metasgd": ["ways=5", "algorithm.eval_inner_steps=2"],
    "mamlpp": ["ways=5", "algorithm.eval_inner_steps=2"],
    "reptile": ["ways=5", "algorithm.eval_inner_steps=2"],
    "baselinepp": ["algorithm.num_classes=10", "algorithm.finetune.epochs=2"],
    "matchingnet": ["algorithm.fce=true"],
    "mann": ["ways=5", "dataset.episodes=sequence"],
    "lstm": ["ways=5", "dataset.episodes=sequence"],
}


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("algorithm", list(ADAPTED))
def test_every_family_exports_adapted(algorithm, tmp_path, data_dir, cache_dir, omniglot_dir):
    learner = untrained(tmp_path, data_dir, cache_dir, algorithm, *ADAPTED[algorithm])
    support, truth = omniglot_folders(omniglot_dir, tmp_path, classes=5, shots=2, queries=2)
    output = tmp_path / f"{algorithm}.onnx"
    export_learner(learner, output, support)
    items = sorted(truth)
    expected = learner.adapt(support).predict_logits(items).numpy()
    got = session(output).run(["logits"], {"query": learner.prepare_inputs(items, "query").numpy()})[0]
    assert close(got, expected)
