"""The metric learners (ProtoNet, Matching Networks, Relation Networks) and the backbones they share."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from learner_checkpoints import TINY_OMNIGLOT, quiet_trainer

from metalab.algorithms import ALGORITHMS
from metalab.backbones import build_backbone
from metalab.backbones.conv4 import Conv4
from metalab.data.episodes import Episode
from metalab.errors import ConfigError
from metalab.runner import build_datamodule
from metalab.settings import CONFIG_DIR
from metalab.validation import resolve

OMNIGLOT = [1, 28, 28]


def configured(tmp_path, data_dir, cache_dir, algorithm: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.run_dir={tmp_path}",
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir}",
                f"algorithm={algorithm}",
                "dataset=omniglot",
                *overrides,
            ],
        )
    return resolve(cfg)


def learner(config: dict, input_shape=OMNIGLOT, seed: int = 0):
    torch.manual_seed(seed)
    return ALGORITHMS[config["algorithm"]["name"]].from_config(config, list(input_shape), "classification")


def omniglot_episodes(tmp_path, data_dir, cache_dir, ways: int, shots: int, queries: int, count: int) -> Episode:
    """`count` fixed test episodes of real Omniglot (unseen classes)."""
    config = configured(
        tmp_path,
        data_dir,
        cache_dir,
        "protonet",
        f"test_ways={ways}",
        f"test_shots={shots}",
        f"test_queries={queries}",
        f"test_episodes={count}",
        f"eval_batch_size={count}",
    )
    datamodule = build_datamodule(config)
    datamodule.setup("test")
    return datamodule.example_batch("test")


def random_episodes(tasks: int, ways: int, shots: int, queries: int, shape=OMNIGLOT) -> Episode:
    labels = torch.arange(ways)
    return Episode(
        torch.rand(tasks, ways * shots, *shape),
        labels.repeat_interleave(shots).expand(tasks, -1),
        torch.rand(tasks, ways * queries, *shape),
        labels.repeat_interleave(queries).expand(tasks, -1),
    )


VARIANTS = {
    "protonet": ("protonet",),
    "matchingnet": ("matchingnet",),
    "matchingnet-fce": ("matchingnet", "algorithm.fce=true"),
    # PyTorch's initialisation: the authors' (the paper setting's) was at chance after 20 steps.
    "relationnet": ("relationnet", "algorithm.init=default"),
}


# ---------------------------------------------------------------- learning on real Omniglot
@pytest.mark.data
@pytest.mark.parametrize("variant", ["matchingnet", "matchingnet-fce", "relationnet"])
def test_learns_omniglot_far_above_chance(variant, tmp_path, data_dir, cache_dir):
    # 80 training episodes (20 steps × 4 tasks, 5-way 1-shot), then 40 fixed test episodes. The
    # full context embeddings' LSTMs learn slower: after 20 steps they ranged 0.30-0.53 over three
    # seeds (on chance, a test of the seed), after 50 steps 0.73-0.76, so FCE trains 50.
    config = configured(
        tmp_path,
        data_dir,
        cache_dir,
        *VARIANTS[variant],
        "queries=5",
        "meta_batch_size=4",
        "test_queries=5",
        "test_episodes=40",
        "eval_batch_size=20",
    )
    datamodule = build_datamodule(config)
    model = learner(config)
    trainer = quiet_trainer(
        max_steps=50 if variant == "matchingnet-fce" else 20, limit_val_batches=0, num_sanity_val_steps=0
    )
    trainer.fit(model, datamodule=datamodule)
    result = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    assert result["test/acc"] > 0.5, result  # chance: 0.2


# ---------------------------------------------------------------- properties of the comparison
@pytest.mark.data
@pytest.mark.parametrize("variant", ["protonet", "matchingnet"])
def test_without_fce_support_order_does_not_matter(variant, tmp_path, data_dir, cache_dir):
    episodes = omniglot_episodes(tmp_path, data_dir, cache_dir, ways=5, shots=3, queries=4, count=2)
    model = learner(configured(tmp_path, data_dir, cache_dir, *VARIANTS[variant])).eval()
    order = torch.randperm(episodes.support_x.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.predict(model.adapt(episodes.support_x, episodes.support_y), episodes.query_x)
        permuted = model.predict(
            model.adapt(episodes.support_x[:, order], episodes.support_y[:, order]), episodes.query_x
        )
    torch.testing.assert_close(permuted, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.data
def test_with_fce_the_support_lstm_reads_the_order(tmp_path, data_dir, cache_dir):
    # The counterpart of the test above: the bidirectional LSTM makes g(x_i, S) order-dependent,
    # so the permutation test can tell the two apart.
    episodes = omniglot_episodes(tmp_path, data_dir, cache_dir, ways=5, shots=3, queries=4, count=2)
    model = learner(configured(tmp_path, data_dir, cache_dir, *VARIANTS["matchingnet-fce"])).eval()
    order = torch.randperm(episodes.support_x.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.predict(model.adapt(episodes.support_x, episodes.support_y), episodes.query_x)
        permuted = model.predict(
            model.adapt(episodes.support_x[:, order], episodes.support_y[:, order]), episodes.query_x
        )
    assert not torch.allclose(permuted, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.data
@pytest.mark.parametrize("variant", ["protonet", "matchingnet"])
def test_queries_equal_to_the_support_images_are_all_right(variant, tmp_path, data_dir, cache_dir):
    # 1-shot: each query is its own class's only support image, so its prototype / its
    # nearest support embedding (cosine 1) is its own, even untrained.
    episodes = omniglot_episodes(tmp_path, data_dir, cache_dir, ways=20, shots=1, queries=1, count=4)
    model = learner(configured(tmp_path, data_dir, cache_dir, *VARIANTS[variant])).eval()
    with torch.no_grad():
        predictions = model.predict(model.adapt(episodes.support_x, episodes.support_y), episodes.support_x)
    assert model.episode_metric(predictions, episodes.support_y).tolist() == [1.0] * 4


def test_matchingnet_gives_log_probabilities_and_survives_a_zero_embedding(tmp_path):
    model = learner(configured(tmp_path, "unused", tmp_path, "matchingnet"))
    batch = random_episodes(2, ways=4, shots=2, queries=3)
    log_probs = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 12))
    # Black images give all-zero features after the last ReLU: the cosine's epsilon keeps it finite.
    zeros = Episode(torch.zeros_like(batch.support_x), batch.support_y, torch.zeros_like(batch.query_x), batch.query_y)
    loss, _ = model.meta_loss(zeros)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("ways", [5, 20])
def test_matchingnet_support_cosine_lifts_the_two_sided_cosines_loss_floor(ways, tmp_path):
    """Non-negative embeddings, each query its own class's support direction and orthogonal to
    the others: the most confident a two-sided cosine can be. Its loss stays at
    log(1 + (N − 1)/e) (0.90 at 5 ways, 2.1 at 20); normalising the support only lets the
    query's norm sharpen the attention, and the loss goes to zero."""
    model = learner(configured(tmp_path, "unused", tmp_path, "matchingnet", "algorithm.similarity=cosine"))
    one_hot = torch.eye(ways).unsqueeze(0)  # one support image per class
    support = torch.eye(ways, 64).unsqueeze(0)  # one-hot directions: non-negative, orthogonal
    query = 50 * support  # long query embeddings pointing at their own class
    floor = torch.log(torch.tensor(1 + (ways - 1) / torch.e))
    cosine = model.attend(model.support_set(support, one_hot), query)
    torch.testing.assert_close(-cosine.diagonal(dim1=1, dim2=2).mean(), floor)
    model.similarity = "support_cosine"
    support_cosine = model.attend(model.support_set(support, one_hot), query)
    assert float(-support_cosine.diagonal(dim1=1, dim2=2).mean()) < 1e-6
    with pytest.raises(ConfigError, match="algorithm.similarity='dot'"):
        learner(configured(tmp_path, "unused", tmp_path, "matchingnet", "algorithm.similarity=dot"))


def test_relationnet_scores_lie_in_unit_interval_and_the_loss_is_the_papers(tmp_path):
    model = learner(configured(tmp_path, "unused", tmp_path, "relationnet"))
    batch = random_episodes(3, ways=5, shots=2, queries=3)
    scores = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x)
    assert scores.shape == (3, 15, 5) and bool(((scores >= 0) & (scores <= 1)).all())
    loss, metrics = model.meta_loss(batch)
    # Σ_{q,k} (r_{q,k} − 1[y_q = k])², averaged over the 3 × 15 × 5 query-class pairs.
    targets = (batch.query_y.unsqueeze(-1) == torch.arange(5)).float()
    torch.testing.assert_close(loss, ((scores - targets) ** 2).sum() / scores.numel())
    torch.testing.assert_close(metrics["acc"], (scores.argmax(-1) == batch.query_y).float().mean(-1))


def test_relationnet_class_feature_is_the_sum_over_shots(tmp_path):
    model = learner(configured(tmp_path, "unused", tmp_path, "relationnet"))
    batch = random_episodes(1, ways=3, shots=4, queries=1)
    classes = model.adapt(batch.support_x, batch.support_y)
    maps = model.backbone(batch.support_x[0])  # one task: the same statistics as under vmap
    assert classes.shape == (1, 3, 64, 7, 7)  # the paper's embedding keeps a 7×7 map of a 28×28 image
    torch.testing.assert_close(classes[0, 1], maps[4:8].sum(0))


def test_relationnet_clips_each_network_apart_as_the_authors(tmp_path):
    """Their script clips the encoder's and the relation module's gradient norms at 0.5 each: both
    end at 0.5 where one clip over all parameters would leave their joint norm at 0.5."""
    overrides = ("algorithm.grad_clip=0.5", "algorithm.grad_clip_per_network=true")
    model = learner(configured(tmp_path, "unused", tmp_path, "relationnet", *overrides))
    loss, _ = model.meta_loss(random_episodes(1, ways=5, shots=1, queries=2))
    (loss * 1e4).backward()  # every network's gradient norm well above 0.5
    model.clip_meta_gradients(optimizer=None)
    for network in (model.backbone, model.relation):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.parameters()]))
        torch.testing.assert_close(norm, torch.tensor(0.5), rtol=1e-4, atol=0)
    with pytest.raises(ConfigError, match="algorithm.grad_clip=0.5"):
        learner(
            configured(
                tmp_path,
                "unused",
                tmp_path,
                "relationnet",
                "algorithm.grad_clip=null",
                "algorithm.grad_clip_per_network=true",
            )
        )


def test_relationnet_sung_init_draws_the_authors_weights(tmp_path):
    model = learner(configured(tmp_path, "unused", tmp_path, "relationnet", "algorithm.init=sung"))
    linears = [m for m in model.relation.modules() if isinstance(m, torch.nn.Linear)]
    assert all(bool((m.bias == 1).all()) for m in linears)  # their linear biases start at 1
    assert abs(float(linears[0].weight.detach().std()) - 0.01) < 0.002
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # He's rule on the fan-out, zero bias
        expected = (2 / (9 * conv.out_channels)) ** 0.5
        assert abs(float(conv.weight.detach().std()) / expected - 1) < 0.1 and not conv.bias.any()
    default = learner(configured(tmp_path, "unused", tmp_path, "relationnet", "algorithm.init=default"))
    assert not any(bool((m.bias == 1).all()) for m in default.relation.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ConfigError, match="algorithm.init='xavier'"):
        learner(configured(tmp_path, "unused", tmp_path, "relationnet", "algorithm.init=xavier"))


# ---------------------------------------------------------------- BatchNorm: training vs meta-test
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_meta_test_a_query_does_not_depend_on_the_other_queries(variant, tmp_path):
    model = learner(configured(tmp_path, "unused", tmp_path, *VARIANTS[variant]))
    assert model.batch_norm == "running"  # the configs' default: the authors' model.eval() protocol
    for _ in range(3):  # training-mode passes: batch statistics, running averages updated
        model.meta_loss(random_episodes(2, 5, 1, 2))
    model.eval()  # as Lightning's validate/test and metalab.load_learner set it
    batch = random_episodes(2, ways=5, shots=2, queries=3)
    with torch.no_grad():
        adapted = model.adapt(batch.support_x, batch.support_y)
        together = model.predict(adapted, batch.query_x)
        one_at_a_time = torch.cat(
            [model.predict(adapted, batch.query_x[:, i : i + 1]) for i in range(batch.query_x.shape[1])], 1
        )
        # and a task's prediction does not depend on the other tasks of its batch either
        first_alone = model.predict(model.adapt(batch.support_x[:1], batch.support_y[:1]), batch.query_x[:1])
    torch.testing.assert_close(one_at_a_time, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(first_alone, together[:1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["protonet", "relationnet"])
def test_running_statistics_are_those_of_the_whole_meta_batch(algorithm, tmp_path):
    """Training normalizes all the meta-batch's images as one batch and moves the running averages
    toward its statistics; `transductive` keeps every task's own statistics and no averages."""
    batch = random_episodes(3, 5, 1, 2)
    model = learner(configured(tmp_path, "unused", tmp_path, algorithm))
    first_norm = model.backbone.layers[0][1]
    model.meta_loss(batch)

    def mean_response(images):  # the first BatchNorm's input, averaged over every task's images
        return model.backbone.layers[0][0](images.flatten(0, 1)).mean((0, 2, 3)).detach()

    # PyTorch's running mean from 0 with momentum 0.1: ProtoNet embeds support and query in one
    # pass (one update), Relation Networks in two (support, then query).
    if algorithm == "protonet":
        expected = 0.1 * mean_response(torch.cat([batch.support_x, batch.query_x], 1))
    else:
        expected = 0.9 * 0.1 * mean_response(batch.support_x) + 0.1 * mean_response(batch.query_x)
    torch.testing.assert_close(first_norm.running_mean, expected, rtol=1e-4, atol=1e-6)
    transductive = learner(configured(tmp_path, "unused", tmp_path, algorithm, "algorithm.batch_norm=transductive"))
    assert transductive.backbone.layers[0][1].running_mean is None
    transductive.eval()
    with torch.no_grad():
        together = transductive.predict(transductive.adapt(batch.support_x, batch.support_y), batch.query_x)
        alone = transductive.predict(transductive.adapt(batch.support_x, batch.support_y), batch.query_x[:, :1])
    assert not torch.allclose(alone, together[:, :1], atol=1e-5)  # the option keeps the old, transductive behaviour


def test_a_checkpoint_without_the_setting_loads_as_it_was_trained(tmp_path):
    """A config written before algorithm.batch_norm existed means per-task statistics: such a
    checkpoint's weights (no running-statistics buffers) load into the learner it was trained as."""
    from metalab.algorithms.base import MetaLearner

    config = configured(tmp_path, "unused", tmp_path, "protonet")
    trained = learner(configured(tmp_path, "unused", tmp_path, "protonet", "algorithm.batch_norm=transductive"))
    old_config = {**config, "algorithm": {k: v for k, v in config["algorithm"].items() if k != "batch_norm"}}
    checkpoint = {
        "hyper_parameters": {"config": old_config, "input_shape": list(OMNIGLOT), "task_type": "classification"},
        "state_dict": trained.state_dict(),
    }  # no running-statistics buffers
    old = MetaLearner.from_checkpoint("old.ckpt", checkpoint)  # strict: every key fits
    assert old.batch_norm == "transductive" and not any("running" in key for key in old.state_dict())
    assert learner(old_config).batch_norm == "running"  # a new config without the key: the yaml's default
    with pytest.raises(ConfigError, match="algorithm.batch_norm='bogus'"):
        learner(configured(tmp_path, "unused", tmp_path, "protonet", "algorithm.batch_norm=bogus"))


# ---------------------------------------------------------------- Matching Networks' full context embeddings
def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step for one vector: gates i, f, g, o (PyTorch's weight layout)."""
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference_fce(model, support, query, steps):
    """g(S) and f(x̂, S) for one task from Vinyals et al. (2016), appendix A.1-A.2, written
    example by example with the learner's LSTM weights.

    g(x_i, S) = h→_i + h←_i + g'(x_i), the two directions of an LSTM over g'(x_1..n) in order;
    f(x̂, S): ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1}); h_k = ĥ_k + f'(x̂);
    r_{k-1} = Σ_i a(h_{k-1}, g(x_i)) g(x_i), a = softmax_i(h_{k-1}ᵀ g(x_i)); f = h_K.
    The LSTM's hidden input is [h, r]: its weights on it are the learner's hidden weights on h
    and its input weights on r. The paper leaves h_0 open; metalab starts from h_0 = f'(x̂), c_0 = 0.
    """
    lstm, cell, dim = model.support_lstm, model.query_cell, support.shape[-1]
    forward = [None] * len(support)
    h = c = torch.zeros(dim, dtype=support.dtype)
    for i in range(len(support)):
        h, c = lstm_step(support[i], h, c, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
        forward[i] = h
    backward = [None] * len(support)
    h = c = torch.zeros(dim, dtype=support.dtype)
    for i in reversed(range(len(support))):
        h, c = lstm_step(
            support[i],
            h,
            c,
            lstm.weight_ih_l0_reverse,
            lstm.weight_hh_l0_reverse,
            lstm.bias_ih_l0_reverse,
            lstm.bias_hh_l0_reverse,
        )
        backward[i] = h
    g = torch.stack([forward[i] + backward[i] + support[i] for i in range(len(support))])
    w_x, w_r = cell.weight_ih[:, :dim], cell.weight_ih[:, dim:]
    w_hidden = torch.cat([cell.weight_hh, w_r], 1)  # the LSTM's weights on its hidden input [h, r]
    f = []
    for x in query:
        h, c = x, torch.zeros(dim, dtype=x.dtype)
        for _ in range(steps):
            attention = torch.softmax(torch.stack([h @ g_i for g_i in g]), 0)
            r = sum(a * g_i for a, g_i in zip(attention, g))
            h_hat, c = lstm_step(x, torch.cat([h, r]), c, w_x, w_hidden, cell.bias_ih, cell.bias_hh)
            h = h_hat + x
        f.append(h)
    return g, torch.stack(f)


def test_full_context_embeddings_follow_the_papers_appendix(tmp_path):
    model = learner(
        configured(tmp_path, "unused", tmp_path, "matchingnet", "algorithm.fce=true", "algorithm.read_steps=3")
    ).double()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default initialization: every term counts
            p.uniform_(-0.5, 0.5)
    torch.manual_seed(1)
    tasks, shots, queries, dim = 2, 5, 4, model.backbone.out_features
    support, query = (
        torch.randn(tasks, shots, dim, dtype=torch.float64),
        torch.randn(tasks, queries, dim, dtype=torch.float64),
    )
    with torch.no_grad():
        g = model.context_support(support)
        f = model.context_query(query, g)
        for t in range(tasks):
            g_t, f_t = reference_fce(model, support[t], query[t], steps=3)
            torch.testing.assert_close(g[t], g_t, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(f[t], f_t, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- shapes at test time
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ways,shots,queries", [(20, 2, 1), (3, 3, 2)])
def test_any_ways_shots_queries_after_training_with_others(variant, ways, shots, queries, tmp_path):
    model = learner(configured(tmp_path, "unused", tmp_path, *VARIANTS[variant], "ways=5", "shots=1"))
    loss, _ = model.meta_loss(random_episodes(2, 5, 1, 2))  # a training step's shapes
    loss.backward()
    batch = random_episodes(2, ways, shots, queries)
    with torch.no_grad():
        predictions = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x)
        metrics = model.evaluate(batch)
    assert predictions.shape == (2, ways * queries, ways)
    assert metrics["acc"].shape == (2,) and torch.isfinite(predictions).all()


@pytest.mark.parametrize("algorithm", ["protonet", "matchingnet", "relationnet"])
def test_resnet12_backbone_serves_every_metric_learner(algorithm, tmp_path):
    fce = ["algorithm.fce=true"] if algorithm == "matchingnet" else []
    config = configured(
        tmp_path, "unused", tmp_path, algorithm, "backbone=resnet12", "backbone.channels=[8,16,16,32]", *fce
    )  # narrow: the shapes, not the width, are under test
    model = learner(config, input_shape=[3, 32, 32])
    batch = random_episodes(1, ways=3, shots=1, queries=2, shape=(3, 32, 32))
    loss, _ = model.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- backbones
def test_conv4_default_is_unchanged_and_feature_maps_are_an_option():
    torch.manual_seed(0)
    default = Conv4((1, 28, 28))
    assert default.out_features == 64
    # Pooled before the ReLU (the same numbers: test_optimization_family.py, channels-last test).
    assert [type(m).__name__ for m in default.layers[0]] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"]
    x = torch.rand(6, 1, 28, 28)
    assert default(x).shape == (6, 64)
    maps = Conv4((1, 28, 28), pooled_blocks=2, feature_map=True)
    maps.load_state_dict(default.state_dict())  # the same parameters, only the pooling differs
    assert maps.out_shape == (64, 7, 7) and maps(x).shape == (6, 64, 7, 7)
    assert Conv4((3, 84, 84), pooled_blocks=2).out_features == 64 * 21 * 21


def test_resnet12_shapes():
    net = build_backbone({"name": "resnet12"}, (3, 84, 84))
    x = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        assert net.out_features == 640 and net(x).shape == (2, 640)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(12.4e6, rel=0.01)
    assert net.out_shape == (640, 5, 5)
    flat = build_backbone({"name": "resnet12", "average_pool": False}, (3, 84, 84))
    assert flat.out_features == 16000


# ---------------------------------------------------------------- bad input
def test_bad_settings_are_refused_naming_the_value(tmp_path):
    with pytest.raises(ConfigError, match="backbone=mlp"):
        learner(configured(tmp_path, "unused", tmp_path, "relationnet", "backbone=mlp"))
    with pytest.raises(ConfigError, match="algorithm.read_steps=0"):
        learner(configured(tmp_path, "unused", tmp_path, "matchingnet", "algorithm.fce=true", "algorithm.read_steps=0"))
    with pytest.raises(ConfigError, match="algorithm.cosine_scale=0"):
        learner(configured(tmp_path, "unused", tmp_path, "matchingnet", "algorithm.cosine_scale=0"))


# ---------------------------------------------------------------- the command line
@pytest.mark.slow
@pytest.mark.data
def test_sweep_of_the_three_then_eval_with_other_ways_and_shots(tmp_path, data_dir, cache_dir):
    import json
    import os
    import sys
    from pathlib import Path

    env = {**os.environ, "METALAB_DATA_DIR": str(data_dir), "METALAB_CACHE_DIR": str(cache_dir)}
    bin_dir = Path(sys.executable).parent
    common = [f"paths.log_dir={tmp_path}", "trainer.enable_progress_bar=false"]
    from preloaded_cli import run_command

    def check(proc):
        assert proc.returncode == 0, proc.stderr[-3000:]

    check(
        run_command(
            [
                str(bin_dir / "metalab-train"),
                "-m",
                *common,
                "algorithm=protonet,matchingnet,relationnet",
                *TINY_OMNIGLOT,
            ],
            env=env,
            cwd=Path.cwd(),
        )
    )
    trained = {
        json.loads(p.read_text())["config"]["algorithm"]: json.loads(p.read_text())
        for p in tmp_path.rglob("results.json")
    }
    assert sorted(trained) == ["matchingnet", "protonet", "relationnet"]
    eval_dir = tmp_path / "eval"
    check(
        run_command(
            [
                str(bin_dir / "metalab-eval"),
                f"paths.log_dir={eval_dir}",
                "trainer.enable_progress_bar=false",
                f"ckpt_path={trained['relationnet']['last_checkpoint']}",
                "test_ways=20",
                "test_shots=2",
                "test_episodes=6",
            ],
            env=env,
            cwd=Path.cwd(),
        )
    )
    (result,) = [json.loads(p.read_text()) for p in eval_dir.rglob("results.json")]
    assert result["config"]["test_ways"] == 20 and 0 <= result["test/acc"] <= 1
