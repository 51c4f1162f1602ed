"""metalab-predict on a folder tree of raw images, as a user would run it; bad input gets a message."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from learner_checkpoints import omniglot_folders, trained_checkpoint
from preloaded_cli import run_command

import metalab
from metalab.predict import main

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def protonet_ckpt(tmp_path_factory, data_dir, cache_dir, omniglot_dir) -> Path:
    return trained_checkpoint("protonet", tmp_path_factory, data_dir, cache_dir)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, omniglot_dir):
    root = tmp_path_factory.mktemp("tree")
    support, query = omniglot_folders(omniglot_dir, root, classes=5, shots=1, queries=3)
    return root, support, query


@pytest.mark.data
def test_cli_writes_the_expected_csv(protonet_ckpt, tree, tmp_path):
    root, support, truth = tree
    output = tmp_path / "out" / "predictions.csv"
    proc = run_command(
        [
            str(BIN / "metalab-predict"),
            f"ckpt_path={protonet_ckpt}",
            f"support={root / 'support'}",
            f"query={root / 'query'}",
            f"output={output}",
        ],
        env=dict(os.environ),
        cwd=Path.cwd(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with output.open(newline="") as file:
        rows = list(csv.DictReader(file))
    labels = sorted(support)  # class folders in sorted order
    assert list(rows[0]) == ["item", "label", "probability", *(f"p:{label}" for label in labels)]
    items = sorted(truth)
    assert [row["item"] for row in rows] == [str(path) for path in items]
    # The same files through the Python API give the same predictions.
    task = metalab.load_learner(protonet_ckpt).adapt({label: support[label] for label in labels})
    expected = task.predict(items)
    for row, p in zip(rows, expected):
        assert row["label"] == p.label
        assert float(row["probability"]) == pytest.approx(p.probability, abs=1e-6)
        assert sum(float(row[f"p:{label}"]) for label in labels) == pytest.approx(1.0, abs=1e-5)
        assert f"{row['item']}  " in proc.stdout  # the printed table
    accuracy = sum(row["label"] == truth[Path(row["item"])] for row in rows) / len(rows)
    assert accuracy >= 0.6, rows  # 15 queries of 5 unseen characters: chance is 0.2


@pytest.mark.data
def test_cli_json_output_and_single_files(protonet_ckpt, tree, tmp_path, capsys):
    root, support, truth = tree
    files = sorted(truth)[:2]
    output = tmp_path / "predictions.json"
    main(
        [
            f"ckpt_path={protonet_ckpt}",
            f"support={root / 'support'}",
            *(f"query={f}" for f in files),
            f"output={output}",
            "independent=true",
        ]
    )
    rows = json.loads(output.read_text())
    assert [row["item"] for row in rows] == [str(f) for f in files]
    for row in rows:
        assert set(row) == {"item", "label", "probability", "probabilities"}
        assert set(row["probabilities"]) == set(support) and row["label"] in support
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    captured = capsys.readouterr()
    assert str(files[0]) in captured.out and "note:" not in captured.err
    task = metalab.load_learner(protonet_ckpt).adapt({label: support[label] for label in sorted(support)})
    for row, p in zip(rows, task.predict(files, independent=True)):
        assert row["label"] == p.label and row["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
    # One item in one pass: ProtoNet meta-tests with BatchNorm's running statistics, so the item
    # gets what it gets among others, and there is nothing to note.
    main([f"ckpt_path={protonet_ckpt}", f"support={root / 'support'}", f"query={files[0]}"])
    assert "note:" not in capsys.readouterr().err


def bad_trees(root: Path, support: dict, ckpt: Path) -> list[tuple[str, list[str], str]]:
    """(case, arguments, text the message must hold) for each kind of bad input."""
    good = root / "support"
    one = next(iter(support.values()))[0]

    def tree(name: str, extra: dict[str, bytes | None]) -> Path:
        base = root / "bad" / name
        for label, files in support.items():
            (base / label).mkdir(parents=True, exist_ok=True)
            for f in files:
                (base / label / f.name).write_bytes(f.read_bytes())
        for rel, content in extra.items():
            path = base / rel
            if content is None:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        return base

    fake = root / "bad" / "fake.ckpt"
    fake.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}}, fake)
    single = root / "bad" / "single"
    (single / "only").mkdir(parents=True, exist_ok=True)
    (single / "only" / one.name).write_bytes(one.read_bytes())
    args = [f"ckpt_path={ckpt}", f"query={one}"]
    return [
        ("not metalab", [f"ckpt_path={fake}", f"support={good}", f"query={one}"], "not a metalab checkpoint"),
        ("empty class", [*args, f"support={tree('empty', {'zzz': None})}"], "zzz is empty"),
        ("single class", [*args, f"support={single}"], "only the class folder 'only'"),
        ("unreadable", [*args, f"support={tree('broken', {'zzz/broken.png': b'garbage'})}"], "zzz/broken.png"),
        ("not an image", [*args, f"support={tree('text', {'zzz/notes.txt': b'hello'})}"], "zzz/notes.txt"),
        ("loose file", [*args, f"support={tree('loose', {'labels.csv': b'a,b'})}"], "labels.csv"),
        ("bad query", [f"ckpt_path={ckpt}", f"support={good}", f"query={root / 'nothing.png'}"], "nothing.png"),
        ("missing ckpt", [f"support={good}", f"query={one}"], "ckpt_path= missing"),
        ("unknown key", [*args, f"support={good}", "shots=3"], "'shots=3'"),
        ("bad output", [*args, f"support={good}", "output=preds.xlsx"], "output=preds.xlsx"),
        ("bad batch", [*args, f"support={good}", "batch_size=0"], "batch_size=0"),
        ("bad flag", [*args, f"support={good}", "independent=maybe"], "independent=maybe"),
    ]


@pytest.mark.data
def test_bad_input_gets_a_message_before_any_work(protonet_ckpt, tree, capsys, monkeypatch):
    root, support, _ = tree
    monkeypatch.setattr(metalab.api.Learner, "adapt", lambda *a: pytest.fail("adapted despite bad input"))
    for case, args, message in bad_trees(root, support, protonet_ckpt):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, case
        assert err.startswith("metalab: error:") and message in err, (case, err)


@pytest.mark.data
def test_module_entry_point_reports_without_traceback(protonet_ckpt, tree):
    root, support, _ = tree
    # A check made before torch is imported: the subprocess stays cheap.
    case = next(c for c in bad_trees(root, support, protonet_ckpt) if c[0] == "bad query")
    proc = subprocess.run(
        [sys.executable, "-m", "metalab.predict", *case[1]], capture_output=True, text=True, check=False, timeout=600
    )
    assert proc.returncode == 2 and case[2] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.data
def test_any_file_name_is_predicted_and_a_failed_write_keeps_the_old_output(
    protonet_ckpt, tree, tmp_path, monkeypatch, capsys
):
    import os
    import shutil

    import metalab.files as files

    root, _, truth = tree
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/query-\xff\xfe.png"))  # not valid UTF-8, fine on Linux
    shutil.copy(sorted(truth)[0], odd)
    output = tmp_path / "predictions.csv"
    output.write_text("earlier predictions\n")
    proc = run_command(
        [
            str(BIN / "metalab-predict"),
            f"ckpt_path={protonet_ckpt}",
            f"support={root / 'support'}",
            f"query={odd}",
            f"output={output}",
        ],
        env=dict(os.environ),
        cwd=Path.cwd(),
        timeout=600,
        text=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = output.read_bytes().splitlines()
    assert header.startswith(b"item,label,probability,p:")
    assert row.startswith(os.fsencode(odd) + b",")  # the file's own name, byte for byte
    assert b"query-\\xff\\xfe.png  " in proc.stdout  # shown escaped in the table

    # A run that fails while writing (here the disk fills) leaves the earlier file whole.
    before = output.read_bytes()

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                f"ckpt_path={protonet_ckpt}",
                f"support={root / 'support'}",
                f"query={sorted(truth)[1]}",
                f"output={output}",
            ]
        )
    assert exit_.value.code == 2 and output.read_bytes() == before
    assert f"metalab: error: cannot write {output}: No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([odd.name, "predictions.csv"])
