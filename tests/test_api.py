"""The application API: load a checkpoint, adapt to labelled examples, predict.

Checkpoints are genuine: a few real Omniglot steps in a Lightning Trainer
(learner_checkpoints.py). Learners join the tests by being added to the lists below.
"""

import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_checkpoints import quiet_trainer, trained_checkpoint
from PIL import Image

import metalab
from metalab.algorithms import ALGORITHMS
from metalab.checkpoint import read_checkpoint
from metalab.data import build_sources
from metalab.errors import ConfigError, DataError
from metalab.runner import build_datamodule

CLASSIFIERS = [
    "protonet",
    "maml",
    "matchingnet",
    "relationnet",
    "baseline",
    "baselinepp",
]  # every classification learner
METRIC = ["protonet", "matchingnet"]  # learners whose predictions must not depend on the support order
# Accuracy floors over 228 queries for the briefly meta-trained metric learners: 4.5 standard
# deviations above chance at 2-way (0.5), 3x chance at 12-way, and about 10 points below what they
# reach with each of torch's CPU kernels (ProtoNet 0.81 / 0.50-0.55, Matching Networks 0.75 / 0.36
# at ATEN_CPU_CAPABILITY=default, avx2 and avx512), so float rounding cannot flip the test.
MUCH_BETTER_THAN_CHANCE = {2: 0.65, 12: 0.25}
FIXED_WAYS = ["maml"]  # learners with an output head sized to the training ways
# BatchNorm with running statistics at meta-test
RUNNING_STATISTICS = ["protonet", "matchingnet", "relationnet", "baseline", "baselinepp"]


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory, data_dir, cache_dir, omniglot_dir):
    return lambda name: trained_checkpoint(name, tmp_path_factory, data_dir, cache_dir)


@pytest.fixture(scope="module")
def protonet(checkpoint):
    return metalab.load_learner(checkpoint("protonet"))


def test_import_metalab_stays_light():
    import subprocess
    import sys

    from metalab.api import load_learner

    code = "import sys, metalab; assert 'torch' not in sys.modules and 'load_learner' in metalab.__all__"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert metalab.load_learner is load_learner


# ---------------------------------------------------------------- the evaluation path, item by item
def evaluation_path(path: Path):
    """metalab-eval's path: test accuracy from trainer.test, with the logits its learner produced."""
    cls = ALGORITHMS[read_checkpoint(path)["hyper_parameters"]["config"]["algorithm"]["name"]]
    model = cls.load_from_checkpoint(path, map_location="cpu")
    logits = []
    predict = model.predict
    model.predict = lambda *args: logits.append(predict(*args)) or logits[-1]  # record, change nothing
    datamodule = build_datamodule(model.run_config)
    datamodule.setup("test")
    metrics = quiet_trainer().test(model, datamodule=datamodule, verbose=False)[0]
    episodes = [
        episode
        for batch in datamodule.test_dataloader()  # eval_batch_size=10 episodes per batch
        for episode in zip(*batch)
    ]
    return metrics["test/acc"], episodes, torch.cat(logits)


@pytest.mark.data
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_predictions_equal_the_evaluation_path(name, checkpoint):
    path = checkpoint(name)
    test_acc, episodes, eval_logits = evaluation_path(path)
    learner = metalab.load_learner(path)
    names = [f"class-{k}" for k in range(5)]  # class names stand in for the integer labels
    accuracies = []
    for (support_x, support_y, query_x, query_y), logits in zip(episodes, eval_logits):
        task = learner.adapt(support_x, labels=[names[y] for y in support_y.tolist()])
        predictions = task.predict(query_x)  # a tensor batch of model-ready images
        assert task.labels == tuple(names)  # first appearance order: the episode's label order
        assert [p.label for p in predictions] == [names[k] for k in logits.argmax(-1).tolist()]
        # Batched over 10 tasks there, over 1 here: the same numbers up to float rounding.
        torch.testing.assert_close(task.predict_proba(query_x), logits.softmax(-1), rtol=0, atol=2e-3)
        accuracies.append(np.mean([p.label == names[y] for p, y in zip(predictions, query_y.tolist())]))
    assert len(accuracies) == 20
    assert np.mean(accuracies) == pytest.approx(test_acc, abs=1e-6)
    assert np.mean(accuracies) > 0.3  # learned: 5-way chance is 0.2, over 500 queries


# ---------------------------------------------------------------- labels, probabilities, order
def omniglot_test_images(data_dir, cache_dir, classes: int, per_class: int, seed: int = 0):
    """{class name: uint8 [n, 1, 28, 28]} of unrotated Omniglot test-split characters, as cached."""
    source = build_sources(
        {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True}, data_dir, cache_dir
    )["test"]
    unrotated = [i for i, name in enumerate(source.class_names) if name.endswith("rot000")]
    chosen = random.Random(seed).sample(unrotated, classes)
    return {source.class_names[i].removesuffix("/rot000"): source.class_images(i)[:per_class] for i in chosen}


@pytest.fixture(scope="module")
def images(data_dir, cache_dir, omniglot_dir):
    return omniglot_test_images(data_dir, cache_dir, classes=5, per_class=6)


def support_and_query(images, shots=1):
    support = {name: list(x[:shots].float() / 255) for name, x in images.items()}
    query = [x.float() / 255 for xs in images.values() for x in xs[shots:]]
    truth = [name for name, xs in images.items() for _ in xs[shots:]]
    return support, query, truth


@pytest.mark.data
def test_labels_round_trip_and_probabilities_sum_to_one(protonet, images):
    support, query, truth = support_and_query(images)
    names = list(support)
    labels = ["cat", 7, ("a", 1), 2.5, "cat-2"]  # any hashable values
    renamed = dict(zip(labels, support.values()))
    task = protonet.adapt(renamed)
    assert task.labels == tuple(labels)
    predictions = task.predict(query)
    assert len(predictions) == len(query)
    for p in predictions:
        assert p.label in labels and list(p.probabilities) == labels
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.probability == max(p.probabilities.values()) == p.probabilities[p.label]
    proba = task.predict_proba(query)
    assert proba.shape == (len(query), 5)
    torch.testing.assert_close(proba.sum(-1), torch.ones(len(query)))
    by_name = dict(zip(labels, support))
    for found in (predictions, task.predict(query, independent=True)):
        accuracy = np.mean([by_name[p.label] == t for p, t in zip(found, truth)])
        assert accuracy > 0.5, accuracy  # 25 queries of 5 unseen classes, chance 0.2
    # The three ways of giving a support set are the same task.
    pairs = [(x, label) for label, xs in renamed.items() for x in xs]
    for other in (protonet.adapt(pairs), protonet.adapt([x for x, _ in pairs], labels=[y for _, y in pairs])):
        assert other.labels == task.labels
        torch.testing.assert_close(other.predict_proba(query), proba)
    # Classes may have different numbers of examples.
    uneven = protonet.adapt({"cat": [*support[names[0]], query[0]], **dict(list(renamed.items())[1:])})
    torch.testing.assert_close(uneven.predict_proba(query).sum(-1), torch.ones(len(query)))
    # One item in, one Prediction out.
    single = task.predict(query[0], independent=True)
    assert (
        single.label in labels and single.probabilities == task.predict([query[0]], independent=True)[0].probabilities
    )


@pytest.mark.data
@pytest.mark.parametrize("name", METRIC)
def test_support_order_does_not_change_metric_predictions(name, checkpoint, images):
    learner = metalab.load_learner(checkpoint(name))
    support, query, _ = support_and_query(images, shots=2)
    pairs = [(x, label) for label, xs in support.items() for x in xs]
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    assert [y for _, y in shuffled] != [y for _, y in pairs]
    a, b = learner.adapt(pairs).predict(query), learner.adapt(shuffled).predict(query)
    assert [p.label for p in a] == [p.label for p in b]
    for p, q in zip(a, b):
        assert p.probabilities == pytest.approx(q.probabilities, abs=1e-5)


@pytest.mark.data
@pytest.mark.parametrize("name", METRIC)
def test_metric_learners_take_any_number_of_classes(name, checkpoint, data_dir, cache_dir):
    learner = metalab.load_learner(checkpoint(name))  # meta-trained briefly on 5-way episodes
    many = omniglot_test_images(data_dir, cache_dir, classes=12, per_class=20, seed=1)  # 1 shot, 19 queries
    names = list(many)
    # Tasks of 2 and of 12 classes, 228 queries at each size (the six disjoint pairs of the twelve
    # classes; all twelve at once), so that no few answers decide the accuracy.
    for tasks in ([names[i : i + 2] for i in range(0, 12, 2)], [names]):
        ways, right, asked = len(tasks[0]), 0, 0
        for classes in tasks:
            support, query, truth = support_and_query({c: many[c] for c in classes})
            predictions = learner.adapt(support).predict(query)
            assert all(len(p.probabilities) == ways for p in predictions)
            right += sum(p.label == t for p, t in zip(predictions, truth))
            asked += len(truth)
        assert right / asked > MUCH_BETTER_THAN_CHANCE[ways], (ways, right / asked)


@pytest.mark.data
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_adapt_once_predict_many(name, checkpoint, images, monkeypatch):
    learner = metalab.load_learner(checkpoint(name))
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    calls = []
    adapt = learner.model.adapt
    monkeypatch.setattr(learner.model, "adapt", lambda *args: calls.append(1) or adapt(*args))
    support, query, _ = support_and_query(images)
    task = learner.adapt(support)
    first = task.predict_proba(query)
    for _ in range(2):
        torch.testing.assert_close(task.predict_proba(query), first, rtol=0, atol=0)
    assert len(calls) == 1
    # Adapting and predicting leave the meta-trained weights as they were.
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    # batch_size: passes of that many items; the default is one pass over all of them.
    torch.testing.assert_close(task.predict_proba(query, batch_size=len(query)), first, rtol=0, atol=0)
    if learner.transductive:  # BatchNorm with each pass's statistics (the MAML family)
        with pytest.warns(UserWarning, match="independent=True"):  # passes too small to hold every class
            alone = task.predict_proba(query, batch_size=1)
        with pytest.warns(UserWarning, match="independent=True"):
            torch.testing.assert_close(alone[3:4], task.predict_proba(query[3:4]), rtol=0, atol=0)
    else:
        alone = task.predict_proba(query, batch_size=1)
    torch.testing.assert_close(alone.sum(-1), torch.ones(len(query)))
    # independent: each item in a pass with the support examples, whatever else is predicted
    # (the passes run batched as tasks: equal up to float rounding).
    independent = task.predict_proba(query, independent=True)
    for i in (0, 3, len(query) - 1):
        beside_support = task.predict_proba(torch.stack([*task.support_x, query[i]]))[-1]
        torch.testing.assert_close(independent[i], beside_support, rtol=0, atol=1e-5)
        # (with running statistics an independent item is predicted alone: equal up to float rounding)
        torch.testing.assert_close(
            task.predict_proba(query[i], independent=True)[0],
            beside_support,
            rtol=0,
            atol=0 if learner.transductive else 1e-5,
        )


@pytest.mark.data
@pytest.mark.parametrize("name", RUNNING_STATISTICS)
def test_metric_predictions_do_not_depend_on_the_other_items(name, checkpoint, images):
    """The metric learners meta-test with BatchNorm's running statistics (eval mode), as their
    authors' code does: an item predicted alone gets what it gets in a batch."""
    learner = metalab.load_learner(checkpoint(name))
    assert not learner.transductive
    support, query, _ = support_and_query(images)
    task = learner.adapt(support)
    together = task.predict_proba(query)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the passes do not interact
        one_at_a_time = torch.cat([task.predict_proba(item.unsqueeze(0)) for item in query])
    torch.testing.assert_close(one_at_a_time, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(task.predict_proba(query, independent=True), together, rtol=0, atol=1e-5)


@pytest.mark.data
def test_a_metric_checkpoint_from_before_running_statistics_still_loads(checkpoint, images, tmp_path):
    """A checkpoint written before algorithm.batch_norm existed (no such key, no running-statistics
    buffers) loads as the transductive learner it was trained as."""
    saved = torch.load(checkpoint("protonet"), map_location="cpu", weights_only=False)
    algorithm = saved["hyper_parameters"]["config"]["algorithm"]
    del algorithm["batch_norm"]
    saved["state_dict"] = {
        k: v
        for k, v in saved["state_dict"].items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    learner = metalab.load_learner(old)
    assert learner.transductive and learner.model.batch_norm == "transductive"
    support, query, _ = support_and_query(images)
    assert torch.isfinite(learner.adapt(support).predict_logits(query)).all()


# ---------------------------------------------------------------- the training transform
def archive_members(omniglot_dir: Path, character: str) -> list[tuple[Path, str]]:
    for archive in sorted(omniglot_dir.glob("images_*.zip")):
        with zipfile.ZipFile(archive) as zf:
            members = sorted(n for n in zf.namelist() if f"/{character}/" in n and n.endswith(".png"))
        if members:
            return [(archive, m) for m in members]
    raise AssertionError(character)


@pytest.mark.data
def test_raw_images_get_the_training_transform(protonet, images, omniglot_dir, tmp_path):
    assert protonet.transform.invert and protonet.transform.input_shape == (1, 28, 28)
    character, cached = next(iter(images.items()))
    for (archive, member), expected in zip(archive_members(omniglot_dir, character), cached):
        file = tmp_path / Path(member).name
        with zipfile.ZipFile(archive) as zf:
            file.write_bytes(zf.read(member))  # a raw 105x105 black-on-white PNG
        expected = expected.float() / 255  # the cached training image, as episodes scale it
        for item in (file, str(file), Image.open(file), np.asarray(Image.open(file).convert("L"))):
            assert torch.equal(protonet.transform(item), expected), type(item)


# ---------------------------------------------------------------- bad input: clear messages before any work
@pytest.mark.data
def test_bad_support_sets_are_refused_naming_the_problem(protonet, images, tmp_path, monkeypatch):
    support, _, _ = support_and_query(images)
    names = list(support)
    x = support[names[0]][0]
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not a png at all")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    monkeypatch.setattr(protonet.model, "adapt", lambda *a: pytest.fail("adapted despite bad input"))
    cases = [
        ({names[0]: [x]}, None, "at least 2 classes"),
        ({names[0]: [x], names[1]: []}, None, f"class {names[1]!r} has no examples"),
        ([x, x, x], ["a", None, "b"], "support example 1"),
        ([x, x, x], ["a", "b"], "3 support examples but 2 labels"),
        ({"a": [x], "b": [garbage]}, None, str(garbage)),
        ({"a": [x], "b": [notes]}, None, str(notes)),
        ({"a": [x], "b": [tmp_path / "missing.png"]}, None, "missing.png"),
        ({"a": [x], "b": [torch.rand(3, 28, 28)]}, None, "[3, 28, 28]"),
        ({"a": [x], "b": [x]}, {"c": 1}, "labels= is given"),
        ([x, x], [["a"], ["b"]], "hashable"),
    ]
    for support_set, labels, message in cases:
        with pytest.raises(DataError) as error:
            protonet.adapt(support_set, labels=labels)
        assert message in str(error.value), (message, str(error.value))


@pytest.mark.data
def test_bad_query_and_batch_size(protonet, images, tmp_path):
    support, query, _ = support_and_query(images)
    task = protonet.adapt(support)
    with pytest.raises(DataError, match="no query items"):
        task.predict([])
    with pytest.raises(ConfigError, match="batch_size=0"):
        task.predict(query, batch_size=0)
    with pytest.raises(ConfigError, match="leave batch_size out"):
        task.predict(query, batch_size=5, independent=True)
    with pytest.raises(DataError, match="query item 1"):
        task.predict([query[0], torch.rand(28, 28)])


@pytest.mark.data
@pytest.mark.parametrize("name", FIXED_WAYS)
def test_fixed_ways_learners_refuse_other_class_counts(name, checkpoint, images):
    learner = metalab.load_learner(checkpoint(name))
    support, _, _ = support_and_query(images)
    three = dict(list(support.items())[:3])
    with pytest.raises(ConfigError, match=r"exactly ways=5 classes, but the support set has 3"):
        learner.adapt(three)


def test_files_that_are_not_metalab_checkpoints_are_refused(tmp_path):
    fake = tmp_path / "fake.ckpt"
    torch.save({"state_dict": {}}, fake)
    text = tmp_path / "text.ckpt"
    text.write_text("hello")
    for path, message in (
        (fake, "not a metalab checkpoint"),
        (text, "not a readable PyTorch checkpoint"),
        (tmp_path / "none.ckpt", "does not exist"),
    ):
        with pytest.raises(ConfigError, match=message):
            metalab.load_learner(path)


def test_regression_checkpoints_are_refused(tmp_path):
    from test_learners import sinusoid_setup

    model, datamodule = sinusoid_setup(tmp_path, **{"trainer.max_steps": 1})
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "sinusoid.ckpt")
    with pytest.raises(ConfigError, match="image classification"):
        metalab.load_learner(tmp_path / "sinusoid.ckpt")
    with pytest.raises(ConfigError, match="no CUDA GPU|device="):
        metalab.load_learner(tmp_path / "sinusoid.ckpt", device="cuda" if not torch.cuda.is_available() else "x")


@pytest.mark.data
@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_one_learner_shared_by_threads_predicts_as_it_does_alone(name, checkpoint, images):
    """An application may call one Learner from the threads of its own server. The gradient
    learners run their network through torch.func.functional_call, which puts the fast weights
    into the shared module for the length of each call: two threads at once saw each other's
    weights (a MAML checkpoint predicting from 4 threads: 6 of 200 answers wrong, and the module
    left holding a vmapped tensor, so the next adapt failed)."""
    import threading

    learner = metalab.load_learner(checkpoint(name))
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    support, query, _ = support_and_query(images)
    task = learner.adapt(support)
    alone = task.predict_proba(query)
    answers, failures = [], []

    def predict_many():
        try:
            for _ in range(25):
                answers.append(task.predict_proba(query))
                learner.adapt(support)  # adapting too, in the same threads
        except Exception as error:  # collected: a thread's exception would not fail the test
            failures.append(repr(error))

    threads = [threading.Thread(target=predict_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures[:2]
    assert len(answers) == 100
    for answer in answers:
        torch.testing.assert_close(answer, alone, rtol=0, atol=1e-6)
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    torch.testing.assert_close(learner.adapt(support).predict_proba(query), alone, rtol=0, atol=1e-6)
