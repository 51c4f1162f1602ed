"""The transfer baselines: Baseline and Baseline++ (Chen et al. 2019) and the MAML paper's
pretrained sinusoid baseline (algorithms/baseline.py, algorithms/pretrained.py)."""

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from learner_checkpoints import quiet_trainer
from preloaded_cli import metalab_command
from torch import nn

from metalab.algorithms import ALGORITHMS
from metalab.algorithms.baseline import fit_heads, head_logits, initial_head
from metalab.data import build_sources
from metalab.data.episodes import ImageClassSource, episode_generator
from metalab.data.global_labels import GlobalLabelSource
from metalab.errors import ConfigError
from metalab.runner import build_datamodule
from metalab.settings import CONFIG_DIR
from metalab.validation import resolve

FINETUNE = {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-3}  # baselinefinetune.py line 33


def composed(tmp_path, *overrides: str, data_dir=None, cache_dir=None) -> dict:
    paths = [f"paths.run_dir={tmp_path}", f"paths.cache_dir={cache_dir or tmp_path}"]
    paths += [f"paths.data_dir={data_dir}"] if data_dir else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return resolve(compose("train", overrides=[*paths, *overrides]))


# ---------------------------------------------------------------- fitting a head per test episode
class CosineHead(nn.Module):
    """Chen et al.'s distLinear (backbone.py lines 22-44), written with torch's own weight norm."""

    def __init__(self, direction: torch.Tensor, norm: torch.Tensor, scale: float):
        super().__init__()
        linear = nn.Linear(direction.shape[1], direction.shape[0], bias=False)
        self.linear = nn.utils.parametrizations.weight_norm(linear, dim=0)
        with torch.no_grad():
            self.linear.parametrizations.weight.original0.copy_(norm.unsqueeze(1))  # g
            self.linear.parametrizations.weight.original1.copy_(direction)  # v
        self.scale = scale

    def forward(self, x):
        return self.scale * self.linear(x / (x.norm(dim=1, keepdim=True) + 1e-5))


def per_task_reference(kind, features, labels, ways, epochs, batch_size, scale, seed):
    """Each task's head fitted alone by torch.optim.SGD, as baselinefinetune.py lines 27-50, from
    the start and example order `fit_heads` draws (the same for every task)."""
    heads = []
    for x, y in zip(features, labels):
        generator = torch.Generator().manual_seed(seed)
        start = initial_head(kind, ways, x.shape[1], generator)
        if kind == "linear":
            module = nn.Linear(x.shape[1], ways)
            with torch.no_grad():
                module.weight.copy_(start["weight"])
                module.bias.copy_(start["bias"])
        else:
            module = CosineHead(start["direction"], start["norm"], scale)
        optimizer = torch.optim.SGD(module.parameters(), **FINETUNE)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for first in range(0, len(x), batch_size):
                chosen = order[first : first + batch_size]
                optimizer.zero_grad()
                nn.functional.cross_entropy(module(x[chosen]), y[chosen]).backward()
                optimizer.step()
        heads.append(module)
    return heads


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("shots", [1, 3])  # 5 and 15 examples: a short last mini-batch in every pass
def test_batched_head_fit_equals_a_per_task_sgd_loop(kind, shots):
    torch.manual_seed(0)
    tasks, ways, dim, epochs, batch_size, scale = 3, 5, 16, 40, 4, 2.0
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    features = torch.randn(tasks, ways * shots, dim) + 2 * torch.randn(tasks, ways, dim).repeat_interleave(shots, 1)
    queries = torch.randn(tasks, 6, dim)
    heads = fit_heads(
        kind,
        features,
        labels,
        ways,
        epochs,
        batch_size,
        **FINETUNE,
        scale=scale,
        generator=torch.Generator().manual_seed(3),
    )
    batched = head_logits(kind, queries, heads, scale)
    reference = per_task_reference(kind, features, labels, ways, epochs, batch_size, scale, seed=3)
    with torch.no_grad():
        expected = torch.stack([head(q) for head, q in zip(reference, queries)])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
    # The fit did something: every task's support loss fell well below its start's.
    head = initial_head(kind, ways, dim, torch.Generator().manual_seed(3))
    start = {n: p.expand(tasks, *p.shape) for n, p in head.items()}

    def support_loss(head):
        logits = head_logits(kind, features, head, scale)
        return nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)

    assert (support_loss(heads) < 0.8 * support_loss(start)).all(), (support_loss(start), support_loss(heads))


def test_a_task_head_does_not_depend_on_the_other_tasks_of_its_batch():
    torch.manual_seed(1)
    features, labels = torch.randn(4, 10, 8), torch.arange(5).repeat(2).expand(4, -1)
    together = fit_heads(
        "cosine", features, labels, 5, 5, 4, **FINETUNE, scale=2.0, generator=torch.Generator().manual_seed(0)
    )
    alone = fit_heads(
        "cosine", features[2:3], labels[2:3], 5, 5, 4, **FINETUNE, scale=2.0, generator=torch.Generator().manual_seed(0)
    )
    for name in together:
        torch.testing.assert_close(together[name][2:3], alone[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training data: global labels
@pytest.mark.data
def test_training_episodes_carry_each_class_index_in_the_training_split(data_dir, cache_dir):
    sources = build_sources(
        {"name": "omniglot", "protocol": "vinyals", "image_size": 28, "invert": True}, data_dir, cache_dir
    )
    train = sources["train"]
    labelled = GlobalLabelSource(train)
    assert labelled.num_classes == len(train.class_names) == 4112  # the vinyals split's training classes
    plain = train.sample(3, 2, 1, episode_generator(0, "train", 7))
    episode = labelled.sample(3, 2, 1, episode_generator(0, "train", 7))
    assert torch.equal(episode.support_x, plain.support_x) and torch.equal(episode.query_x, plain.query_x)
    assert not torch.equal(episode.support_y, plain.support_y)  # global, not 0..ways-1
    for images, labels in ((episode.support_x, episode.support_y), (episode.query_x, episode.query_y)):
        for image, label in zip(images, labels.tolist()):
            of_class = train.class_images(label).float() / 255
            assert any(torch.equal(image, candidate) for candidate in of_class), label
    # The labels follow the classes, not the order they were drawn in.
    assert episode.support_y.tolist() == episode.support_y.view(3, 2)[:, 0].repeat_interleave(2).tolist()


def test_tensorboard_episode_grid_takes_global_labels():
    from metalab.callbacks import class_grid

    images = torch.rand(8, 1, 4, 4)
    labels = torch.tensor([3486, 3486, 12, 12, 401, 401, 7, 7])  # 4 classes, 2 images each, global labels
    grid = class_grid(images, labels, pad=0)
    assert grid.shape == (1, 4 * 4, 2 * 4)
    torch.testing.assert_close(grid[:, :4, :4], images[6])  # first row: the smallest label, 7


@pytest.mark.data
def test_the_classifier_is_sized_from_the_data_and_a_bad_size_is_refused(tmp_path, data_dir, cache_dir):
    config = composed(tmp_path, "experiment=baseline_omniglot_5w1s", data_dir=data_dir, cache_dir=cache_dir)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    learner_cls = ALGORITHMS["baseline"]
    with pytest.raises(ConfigError, match=r"algorithm.num_classes=None is invalid"):
        learner_cls.from_config(config, [1, 28, 28], "classification")  # not built before the data says how many
    learner_cls.settings_from_data(config, datamodule)
    assert config["algorithm"]["num_classes"] == 4112
    model = learner_cls.from_config(config, [1, 28, 28], "classification")
    assert model.classifier["weight"].shape == (4112, model.backbone.out_features)
    config["algorithm"]["num_classes"] = 100
    with pytest.raises(
        ConfigError,
        match=r"num_classes=100 but the training split has 4112 classes; "
        r"set algorithm.num_classes=4112",
    ):
        learner_cls.settings_from_data(config, datamodule)
    few_shot = composed(
        tmp_path,
        "experiment=baseline_omniglot_5w1s",
        "dataset.episodes=few_shot",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    plain = build_datamodule(few_shot)
    plain.setup("fit")
    with pytest.raises(ConfigError, match="set dataset.episodes=global_labels"):
        learner_cls.settings_from_data(few_shot, plain)


def test_transfer_baselines_need_their_kind_of_data(tmp_path):
    config = composed(tmp_path, "algorithm=baseline", "dataset=sinusoid")
    from metalab.validation import check_learner_fits_data

    with pytest.raises(ConfigError, match="dataset=sinusoid"):
        check_learner_fits_data(config, ALGORITHMS["baseline"], "regression")
    with pytest.raises(ConfigError, match="dataset=omniglot"):
        check_learner_fits_data(
            composed(tmp_path, "algorithm=pretrained", "dataset=omniglot"), ALGORITHMS["pretrained"], "classification"
        )


# ---------------------------------------------------------------- learning on real Omniglot
def first_training_classes(datamodule, count: int) -> None:
    """Train on the first `count` classes of the training split only: a classifier over all
    4,112 needs thousands of steps before its features transfer (each class is seen once per
    5,140 steps of 16 images), over 100 it learns in a few hundred."""
    whole = datamodule.sources["train"].source
    subset = ImageClassSource(
        whole.array_path,
        whole.class_names[:count],
        whole._starts[:count],
        whole._counts[:count],
        whole._rotations[:count],
        dataset="omniglot",
        split="train",
    )
    datamodule.sources["train"] = GlobalLabelSource(subset)


@pytest.mark.data
# Baseline++ shares all but its head with Baseline; its run is slow (the default run keeps Baseline's).
@pytest.mark.parametrize("name", ["baseline", pytest.param("baselinepp", marks=pytest.mark.slow)])
def test_transfer_baselines_learn_omniglot_quickly(name, tmp_path, data_dir, cache_dir):
    config = composed(
        tmp_path,
        f"experiment={name}_omniglot_5w1s",
        "test_episodes=20",
        "eval_batch_size=20",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    first_training_classes(datamodule, 100)
    ALGORITHMS[name].settings_from_data(config, datamodule)
    assert config["algorithm"]["num_classes"] == 100
    L.seed_everything(0, verbose=False)
    model = ALGORITHMS[name].from_config(config, list(datamodule.input_shape), datamodule.task_type)
    untrained = quiet_trainer().test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    trainer = quiet_trainer(max_steps=150, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    trained = quiet_trainer().test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    print(f"{name}: 5-way 1-shot test accuracy {untrained:.3f} untrained, {trained:.3f} after 150 steps")
    # 5-way 1-shot on unseen characters (300 queries) after 150 steps of 16 images: chance is 0.2.
    assert trained > 0.5 and trained > untrained + 0.2, (untrained, trained)


# ---------------------------------------------------------------- the pretrained sinusoid baseline
def sinusoid(tmp_path, *overrides: str):
    config = composed(tmp_path, "experiment=pretrained_sinusoid_5shot", *overrides)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    torch.manual_seed(0)
    return ALGORITHMS["pretrained"].from_config(config, [1], "regression"), datamodule


def test_pretraining_is_plain_regression_on_the_support_points(tmp_path):
    model, datamodule = sinusoid(tmp_path)
    batch = datamodule.example_batch()
    loss, metrics = model.meta_loss(batch)
    expected = torch.stack(
        [nn.functional.mse_loss(model.model(x), y) for x, y in zip(batch.support_x, batch.support_y)]
    )
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(metrics["mse"], expected)
    everything, _ = sinusoid(tmp_path, "algorithm.fit_points=all")
    everything.load_state_dict(model.state_dict())
    points_x, points_y = torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)
    joint_loss = nn.functional.mse_loss(model.model(points_x.flatten(0, 1)), points_y.flatten(0, 1))
    torch.testing.assert_close(everything.meta_loss(batch)[0], joint_loss)
    with pytest.raises(ConfigError, match="algorithm.fit_points='query' is unknown"):
        sinusoid(tmp_path, "algorithm.fit_points=query")


def test_pretrained_evaluation_reports_the_error_after_every_fine_tuning_step(tmp_path):
    model, datamodule = sinusoid(tmp_path, "algorithm.eval_inner_steps=4")
    batch = next(iter(datamodule.val_dataloader()))
    from metalab.algorithms.base import evaluation_mode

    with evaluation_mode():
        results = model.evaluate(batch)
        assert set(results) == {"mse", "mse_before", "mse_step1", "mse_step2", "mse_step3", "mse_step4"}
        # `mse` is MAML's figure: the queries' error after adapt's eval_inner_steps SGD steps.
        adapted = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x)
        torch.testing.assert_close(results["mse"], model.episode_metric(adapted, batch.query_y))
        torch.testing.assert_close(results["mse_step4"], results["mse"])
        before = torch.func.vmap(model.model)(batch.query_x)
        torch.testing.assert_close(results["mse_before"], model.episode_metric(before, batch.query_y))
        # Step 1 by hand: θ − α ∇ mean-squared error on the K support points, task by task.
        for t in range(2):
            with torch.enable_grad():
                loss = nn.functional.mse_loss(model.model(batch.support_x[t]), batch.support_y[t])
                grads = torch.autograd.grad(loss, list(model.model.parameters()))
            stepped = {n: p - 0.01 * g for (n, p), g in zip(model.model.named_parameters(), grads)}
            out = torch.func.functional_call(model.model, stepped, (batch.query_x[t],))
            torch.testing.assert_close(results["mse_step1"][t], ((out - batch.query_y[t]) ** 2).mean())
    assert not torch.allclose(results["mse_step1"], results["mse_before"])


def test_pretrained_baseline_learns_sinusoids(tmp_path):
    model, datamodule = sinusoid(tmp_path, "val_episodes=100")
    first = quiet_trainer().validate(model, datamodule=datamodule, verbose=False)[0]
    trainer = quiet_trainer(max_steps=600, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    last = quiet_trainer().validate(model, datamodule=datamodule, verbose=False)[0]
    assert model.train_tasks == 600 * 25
    # Untrained, the network predicts about 0: an error of E[A²]/2 ≈ 4.2. The best single function
    # of x for all tasks, E[y | x] = E[A]·(2/π)·sin x, leaves about 2.9; trained, it nears that,
    # and fine-tuning on the K points lowers the error further.
    assert first["val/mse_before"] > 3.8 and last["val/mse_before"] < 3.5, (first, last)
    assert last["val/mse"] < last["val/mse_step1"] < last["val/mse_before"], last


# ---------------------------------------------------------------- the command line, and the checkpoint round trip
TINY_RUN = [
    "experiment=baselinepp_omniglot_5w1s",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "val_episodes=5",
    "algorithm.finetune.epochs=5",
]


@pytest.mark.slow  # two commands (~25 s); the refusal below covers metalab-train's sizing step in the default run
@pytest.mark.data
def test_metalab_train_sizes_the_classifier_and_metalab_eval_reproduces_its_test(tmp_path, data_dir, cache_dir):
    """metalab-train fills algorithm.num_classes from the data (and logs to TensorBoard, whose
    episode grid reads the global labels); metalab-eval rebuilds the learner from the checkpoint
    alone (its fine-tuning settings included) and meta-tests it to the same figure."""
    import json

    episodes = ["test_episodes=10", "eval_batch_size=5"]
    proc = metalab_command(
        "metalab-train",
        *TINY_RUN,
        *episodes,
        f"paths.run_dir={tmp_path / 'run'}",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "results.json").read_text())
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["config"]["algorithm"]["num_classes"] == 4112
    assert saved["state_dict"]["classifier.direction"].shape[0] == 4112
    proc = metalab_command(
        "metalab-eval",
        f"ckpt_path={checkpoint}",
        *episodes,
        f"paths.run_dir={tmp_path / 'eval'}",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)


@pytest.mark.data
def test_metalab_train_refuses_a_classifier_smaller_than_the_training_classes(tmp_path, data_dir, cache_dir):
    proc = metalab_command(
        "metalab-train",
        *TINY_RUN,
        "algorithm.num_classes=10",
        f"paths.run_dir={tmp_path}",
        "logger=none",
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metalab: error")]
    assert proc.returncode == 2 and errors == [
        "metalab: error: algorithm.num_classes=10 but the training split has 4112 classes; set "
        "algorithm.num_classes=4112, or null to take it from the data"
    ], proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
