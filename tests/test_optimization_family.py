"""The optimization-based family against plain per-task loops, and each learner learning.

Every batched meta-gradient is compared with `metalab.algorithms.reference`, a loop over
tasks with `torch.autograd`, on small double-precision models, to 1e-5.
"""

import sys

import pytest
import torch
from test_learners import quiet_trainer, sinusoid_setup
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from metalab.algorithms import ALGORITHMS
from metalab.algorithms.compile_passes import (
    AUTO_COMPILE_MIN_STEPS,
    auto_compile,
    check_compile,
    cpp_compiler,
    unroll_short_matmuls,
)
from metalab.algorithms.inner_loop import parameter_key
from metalab.algorithms.reference import per_task_meta_loss, per_task_reptile_direction, reference_meta_loss
from metalab.data.episodes import Episode
from metalab.errors import ConfigError
from metalab.settings import group_defaults
from metalab.validation import check_learner_fits_data

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 4
MLP = {"name": "mlp", "hidden_sizes": [7, 6]}
TINY_CONV = {"name": "conv4", "hidden_channels": 3, "blocks": 2}  # has BatchNorm: MAML++'s per-step norms matter
CE = torch.nn.functional.cross_entropy
needs_cpp_compiler = pytest.mark.skipif(
    cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler (g++, or $CXX): none found"
)


def small_learner(name: str, backbone: dict, input_shape: list[int], **algorithm):
    settings = {
        "name": name,
        "inner_lr": 0.3,
        "inner_steps": 2,
        "eval_inner_steps": 2,
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
        **algorithm,
    }
    if "first_order" in group_defaults("algorithm", name):  # MAML++ anneals it; Reptile has none
        settings.setdefault("first_order", False)
    torch.manual_seed(0)
    return (
        ALGORITHMS[name]
        .from_config({"algorithm": settings, "backbone": backbone, "ways": WAYS}, input_shape, "classification")
        .double()
    )


def random_batch(input_shape: list[int]) -> Episode:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(WAYS)
    return Episode(
        support_x=torch.randn(TASKS, WAYS * SHOTS, *input_shape, generator=g, dtype=torch.float64),
        support_y=labels.repeat_interleave(SHOTS).repeat(TASKS, 1),
        query_x=torch.randn(TASKS, WAYS * QUERIES, *input_shape, generator=g, dtype=torch.float64),
        query_y=labels.repeat_interleave(QUERIES).repeat(TASKS, 1),
    )


def gradients(loss: torch.Tensor, model) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def assert_same_gradients(model, batch: Episode, reference_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss, _ = model.meta_loss(batch)
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)
    ours, theirs = gradients(loss, model), gradients(reference_loss, model)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")
    return ours


@pytest.mark.parametrize("steps", [1, 3])
def test_fomaml_meta_gradient_matches_loop_and_differs_from_second_order(steps):
    model, batch = small_learner("fomaml", MLP, [5], inner_steps=steps, first_order=False), random_batch([5])
    # first_order=false in its config does not matter: first-order MAML is always first order.
    reference = per_task_meta_loss(model.model, batch, steps, lambda k, n: 0.3, True, CE)
    ours = assert_same_gradients(model, batch, reference)
    second = gradients(per_task_meta_loss(model.model, batch, steps, lambda k, n: 0.3, False, CE), model)
    assert max((ours[n] - second[n]).abs().max().item() for n in ours) > 1e-4


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_matches_loop_adapting_only_the_head(first_order):
    model, batch = small_learner("anil", MLP, [5], inner_steps=3, first_order=first_order), random_batch([5])
    head = ["1.weight", "1.bias"]
    reference = per_task_meta_loss(model.model, batch, 3, lambda k, n: 0.3, first_order, CE, adapted_names=head)
    ours = assert_same_gradients(model, batch, reference)
    assert ours["model.0.layers.1.weight"].abs().sum() > 0  # the body is meta-learned by the outer loop
    # ... and differs from MAML's, which adapts the body too.
    maml = gradients(per_task_meta_loss(model.model, batch, 3, lambda k, n: 0.3, first_order, CE), model)
    assert (ours["model.0.layers.1.weight"] - maml["model.0.layers.1.weight"]).abs().max() > 1e-6


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_meta_gradient_matches_loop_including_the_learned_rates(first_order):
    model, batch = small_learner("metasgd", MLP, [5], inner_steps=2, first_order=first_order), random_batch([5])
    with torch.no_grad():  # distinct rates per element, so a mix-up of elements would show
        for alpha in model.inner_lrs.values():
            alpha.uniform_(0.05, 0.5)
    lrs = {n: model.inner_lrs[parameter_key(n)] for n, _ in model.model.named_parameters()}
    reference = per_task_meta_loss(model.model, batch, 2, lambda k, n: lrs[n], first_order, CE)
    ours = assert_same_gradients(model, batch, reference)
    assert all(ours[f"inner_lrs.{parameter_key(n)}"].abs().sum() > 0 for n in lrs)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("multi_step_loss", [True, False])
def test_mamlpp_meta_gradient_matches_loop(first_order, multi_step_loss):
    steps, shape = 3, [1, 8, 8]
    model = small_learner(
        "mamlpp",
        TINY_CONV,
        shape,
        inner_steps=steps,
        msl_steps=100 if multi_step_loss else 0,
        first_order_steps=10**9 if first_order else 0,
    )
    batch = random_batch(shape)
    with torch.no_grad():  # per-step rates and norms that differ, so using the wrong step would show
        for rates in model.step_lrs.values():
            rates.uniform_(0.05, 0.5)
        for norms in model.step_norms.values():
            norms.add_(torch.randn_like(norms) * 0.3)
    assert model.training_first_order() == first_order
    weights = model.step_loss_weights(0)
    assert (weights is not None) == multi_step_loss
    if weights is not None:
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    adapted = model.adapted_names
    lrs = {n: model.step_lrs[parameter_key(n)] for n in adapted}

    def step_norms(k: int) -> dict:
        return {n: model.step_norms[parameter_key(n)][k - 1] for n in model.norm_names} if k > 0 else {}

    reference = per_task_meta_loss(
        model.model,
        batch,
        steps,
        lambda k, n: lrs[n][k],
        first_order,
        CE,
        adapted_names=adapted,
        step_params=step_norms,
        step_weights=None if weights is None else weights.double(),
    )
    ours = assert_same_gradients(model, batch, reference)
    assert model.norm_names and all(ours[f"step_lrs.{parameter_key(n)}"].abs().sum() > 0 for n in adapted)


def test_mamlpp_schedules_anneal():
    model = small_learner("mamlpp", MLP, [5], inner_steps=4, msl_steps=100, first_order_steps=50)
    first = model.step_loss_weights(0)
    torch.testing.assert_close(first, torch.full((4,), 0.25))
    middle, end = model.step_loss_weights(50), model.step_loss_weights(99)
    assert middle[-1] > first[-1] and middle[0] < first[0]  # weight moves toward the last step
    assert end[0] >= 0.03 / 4 and end[-1] > middle[-1]
    torch.testing.assert_close(middle.sum(), torch.tensor(1.0))
    assert model.step_loss_weights(100) is None  # then only the last step counts
    assert model.first_order_at(49) and not model.first_order_at(50)  # derivative-order annealing


def test_reptile_outer_update_is_the_mean_adapted_direction_times_the_meta_step():
    meta_step = 0.7
    model = small_learner(
        "reptile",
        MLP,
        [5],
        inner_steps=4,
        inner_lr=0.1,
        inner_optimizer="sgd",
        adam_beta1=0.0,
        adam_beta2=0.999,
        optimizer={"_target_": "torch.optim.SGD", "lr": meta_step},
    )
    batch = random_batch([5])
    direction = per_task_reptile_direction(model.model, batch, 4, 0.1, CE)
    before = [p.detach().clone() for p in model.model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=meta_step)
    loss, metrics = model.meta_loss(batch)
    loss.backward()
    optimizer.step()
    for p, p0, d in zip(model.model.parameters(), before, direction):
        torch.testing.assert_close(p.detach(), p0 - meta_step * d, atol=1e-10, rtol=1e-10)
    assert metrics["loss"].shape == (TASKS,) and torch.isfinite(metrics["loss"]).all()


def test_reptile_adam_inner_loop_matches_torch_adam_per_task():
    model = small_learner(
        "reptile", MLP, [5], inner_steps=3, inner_lr=0.01, inner_optimizer="adam", adam_beta1=0.0, adam_beta2=0.999
    )
    batch = random_batch([5])
    adapted, _ = model.inner_adapt(batch.support_x, batch.support_y, 3, True, False)
    for t in range(TASKS):
        copy = small_learner("reptile", MLP, [5], inner_optimizer="adam", adam_beta1=0.0, adam_beta2=0.999)
        optimizer = torch.optim.Adam(copy.model.parameters(), lr=0.01, betas=(0.0, 0.999))
        for _ in range(3):
            optimizer.zero_grad()
            CE(copy.model(batch.support_x[t]), batch.support_y[t]).backward()
            optimizer.step()
        for name, p in copy.model.named_parameters():
            torch.testing.assert_close(adapted[name][t], p.detach(), atol=1e-7, rtol=1e-6)


# fomaml and metasgd are maml's code path, first order or with learned rates (their gradients are
# tested against the loop): slow here.
@pytest.mark.parametrize(
    "algorithm",
    [
        "maml",
        pytest.param("fomaml", marks=pytest.mark.slow),
        "reptile",
        "anil",
        pytest.param("metasgd", marks=pytest.mark.slow),
        # the default run trains MAML++ in the next test, which asserts this and more
        pytest.param("mamlpp", marks=pytest.mark.slow),
        pytest.param("maml+compile", marks=[needs_cpp_compiler, pytest.mark.slow]),
    ],
)
def test_each_learner_meta_trained_briefly_on_sinusoid_adapts_to_new_tasks(tmp_path, algorithm):
    steps = 1000
    # Each learner with its own defaults (conf/algorithm/), except Reptile: its paper setting
    # (5 inner steps, meta step 0.1) needs many more outer steps than a test can afford.
    faster = (
        {"algorithm.inner_steps": 10, "algorithm.eval_inner_steps": 10, "algorithm.optimizer.lr": 0.5}
        if algorithm == "reptile"
        else {}
    )
    algorithm, _, compiled = algorithm.partition("+")  # maml+compile: the torch.compile'd outer step
    model, datamodule = sinusoid_setup(
        tmp_path,
        algorithm=algorithm,
        test_episodes=100,
        val_episodes=0,
        **{"trainer.max_steps": steps},
        **faster,
        **({"algorithm.compile": "true"} if compiled else {}),
    )
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert (model._meta_gradient is not None) == bool(compiled)  # the outer steps took the path asked for
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    # After the inner loop, a new sine's error is well below the meta-learned prior's.
    assert metrics["test/mse"] < 0.5 * metrics["test/mse_before"], metrics


def test_mamlpp_at_its_defaults_adapts_every_sinusoid_task_without_blowing_up(tmp_path):
    # Seed 2 of the training stream: with the learned inner rates on Adam's 0.001 (step_lr_lr=null)
    # they reached 0.38 and -0.25 within 1,000 steps, and adapting made 11 of 100 test tasks worse,
    # one to an error of 166 (the worst before adaptation: 14.4); the mean stayed at 3.52 of 3.73.
    model, datamodule = sinusoid_setup(
        tmp_path, algorithm="mamlpp", seed=2, test_episodes=100, val_episodes=0, **{"trainer.max_steps": 1000}
    )
    trainer = quiet_trainer(max_steps=1000, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    errors = model.eval_per_episode["test"]["values"]
    assert metrics["test/mse"] < 0.5 * metrics["test/mse_before"], metrics
    assert max(errors["mse"]) < max(errors["mse_before"]), (max(errors["mse"]), max(errors["mse_before"]))


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from lightning import Callback, Trainer

    from metalab.algorithms.maml import MAML
    from metalab.callbacks import ResumableCheckpoint
    from metalab.errors import TrainingDiverged

    class BlowUpInnerRate(Callback):  # what a too-large inner learning rate does, from step 15 on
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 15:
                module.inner_lr = 1e30

    model, datamodule = sinusoid_setup(tmp_path, **{"trainer.max_steps": 40})
    # metalab's checkpoint callback: the learner says what diverged, the callback which file is still good.
    checkpoints = ResumableCheckpoint(
        dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=10, save_top_k=-1, monitor=None
    )
    trainer = Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_steps=40,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[checkpoints, BlowUpInnerRate()],
    )
    with pytest.raises(TrainingDiverged) as stopped:
        trainer.fit(model, datamodule=datamodule)
    message = str(stopped.value)
    assert "step 15" in message and "loss is" in message and "algorithm.inner_lr=1e+30" in message, message
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'last.ckpt'}" in message, message
    # The update with the bad loss was never applied, and the last checkpoint (step 10) loads and is finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    restored = MAML.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(p).all() for p in restored.parameters())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10


@pytest.mark.parametrize("name", ["maml", "mamlpp"])
def test_checkpointed_inner_steps_give_the_same_second_order_meta_gradient(name):
    shape, extra = [1, 8, 8], ({"msl_steps": 100, "first_order_steps": 0} if name == "mamlpp" else {})
    plain = small_learner(name, TINY_CONV, shape, inner_steps=3, **extra)
    saving = small_learner(name, TINY_CONV, shape, inner_steps=3, checkpoint_inner_steps=True, **extra)
    batch = random_batch(shape)
    ours = gradients(saving.meta_loss(batch)[0], saving)
    reference = gradients(plain.meta_loss(batch)[0], plain)
    for n in reference:
        torch.testing.assert_close(ours[n], reference[n], atol=1e-10, rtol=1e-10)


@needs_cpp_compiler
@pytest.mark.parametrize(
    "name,backbone,shape",
    [
        ("maml", MLP, [5]),
        ("fomaml", MLP, [5]),
        ("metasgd", MLP, [5]),
        pytest.param("maml", TINY_CONV, [1, 8, 8], marks=pytest.mark.slow),
    ],  # conv: BatchNorm, max-pooling
    ids=["maml-mlp", "fomaml-mlp", "metasgd-mlp", "maml-conv"],
)
def test_compiled_meta_gradient_equals_the_loop(name, backbone, shape):
    """algorithm.compile=true: torch.func + torch.compile give the per-task loop's meta-gradient."""
    model, batch = small_learner(name, backbone, shape, inner_steps=1, compile=True), random_batch(shape)
    first_order = name == "fomaml"
    rates = (
        {n: model.inner_lrs[parameter_key(n)] for n, _ in model.model.named_parameters()} if name == "metasgd" else None
    )
    reference_loss = per_task_meta_loss(
        model.model, batch, 1, (lambda k, n: rates[n]) if rates else (lambda k, n: 0.3), first_order, CE
    )
    surrogate, metrics = model.compiled_meta_loss(batch)
    torch.testing.assert_close(metrics["loss"], reference_loss.detach(), atol=1e-5, rtol=1e-5)
    ours, theirs = gradients(surrogate, model), gradients(reference_loss, model)
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-5, rtol=1e-5, msg=f"gradient of {n}")
    assert set(metrics) >= {"acc", "inner_loss", "loss"}


@needs_cpp_compiler
@pytest.mark.slow  # kept out of the default run for its time (10-minute budget); `make test-full` runs it
def test_compiled_mamlpp_follows_its_schedules_and_compiles_once_per_switch(monkeypatch):
    """MAML++ with algorithm.compile=true: the same meta-gradient as eager (itself tested against
    the loop above) at every outer step, while the multi-step loss weights anneal, the
    derivative order switches and the multi-step loss ends: three graphs, not one per step."""
    model = small_learner("mamlpp", MLP, [5], inner_steps=2, msl_steps=4, first_order_steps=2, compile=True)
    batch = random_batch([5])
    with torch.no_grad():  # per-step rates that differ
        for rates in model.step_lrs.values():
            rates.uniform_(0.05, 0.5)
    outer_step = {"now": 0}
    monkeypatch.setattr(type(model), "global_step", property(lambda self: outer_step["now"]))
    graphs_before = counters["stats"]["unique_graphs"]
    for outer_step["now"] in range(6):  # steps 0-1 first order; 0-3 multi-step loss
        surrogate, metrics = model.compiled_meta_loss(batch)
        eager_loss, _ = model.meta_loss(batch)
        torch.testing.assert_close(metrics["loss"], eager_loss.detach(), atol=1e-10, rtol=1e-10)
        ours, theirs = gradients(surrogate, model), gradients(eager_loss, model)
        for n in theirs:
            torch.testing.assert_close(
                ours[n], theirs[n], atol=1e-10, rtol=1e-10, msg=f"outer step {outer_step['now']}: gradient of {n}"
            )
    assert counters["stats"]["unique_graphs"] - graphs_before == 3


def test_short_batched_matmuls_are_rewritten_as_arithmetic_with_the_same_result():
    """The compile pass turns a bmm with a short contraction (an inner step's outer-product
    weight gradient) into a broadcast multiply and sum; a long contraction stays a bmm."""
    g = torch.Generator().manual_seed(0)
    short_left, short_right = torch.randn(4, 9, 5, generator=g), torch.randn(4, 5, 7, generator=g)
    long_left, long_right = torch.randn(4, 9, 30, generator=g), torch.randn(4, 30, 7, generator=g)

    def two_matmuls(a, b, c, d):
        return torch.bmm(a, b) + torch.bmm(c, d)

    graph_module = make_fx(two_matmuls, tracing_mode="fake")(short_left, short_right, long_left, long_right)
    assert unroll_short_matmuls(graph_module.graph) == 1
    graph_module.recompile()
    kept = [node for node in graph_module.graph.nodes if node.target is torch.ops.aten.bmm.default]
    assert [node.args[0].meta["val"].shape[-1] for node in kept] == [30]
    torch.testing.assert_close(
        graph_module(short_left, short_right, long_left, long_right),
        two_matmuls(short_left, short_right, long_left, long_right),
    )


def test_compile_is_refused_where_it_cannot_capture_the_learner(monkeypatch):
    config = {"ways": 5, "test_ways": 5, "dataset": {"name": "omniglot"}}
    for name in ("reptile", "anil", "protonet"):
        with pytest.raises(ConfigError, match=f"algorithm.compile=true is not available for algorithm={name}"):
            check_compile({**config, "algorithm": {"name": name, "compile": True}}, ALGORITHMS[name])
    with pytest.raises(ConfigError, match="checkpoint_inner_steps=true do not combine"):
        check_compile(
            {**config, "algorithm": {"name": "maml", "compile": True, "checkpoint_inner_steps": True}},
            ALGORITHMS["maml"],
        )
    monkeypatch.setenv("CXX", sys.executable)  # any program found stands in for the compiler here
    check_compile({**config, "algorithm": {"name": "maml", "compile": True}}, ALGORITHMS["maml"])
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler .* none was found"):
        check_compile({**config, "algorithm": {"name": "maml", "compile": True}}, ALGORITHMS["maml"])
    # metalab-eval of a checkpoint trained with compile=true never compiles, so it needs no compiler.
    check_learner_fits_data(
        {**config, "algorithm": {"name": "maml", "compile": True}}, ALGORITHMS["maml"], "classification"
    )


def test_compile_auto_compiles_an_mlp_on_a_cpu_in_a_long_run_only(monkeypatch):
    """algorithm.compile=auto (the default): compiled where it was measured to pay, and said why."""
    monkeypatch.setenv("CXX", sys.executable)  # any program found stands in for the compiler here
    long_mlp = {
        "algorithm": {"name": "maml", "compile": "auto"},
        "backbone": MLP,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": AUTO_COMPILE_MIN_STEPS},
    }
    assert small_learner("maml", MLP, [5], compile="auto").compiled is False  # no trainer: steps unknown
    compiled, why = auto_compile(long_mlp, ALGORITHMS["maml"])
    assert compiled and why.startswith("algorithm.compile=auto: compiling the meta-gradient")
    eager = {
        "trainer.max_steps": (
            {"trainer": {**long_mlp["trainer"], "max_steps": 1000}},
            "trainer.max_steps=1000 is under",
        ),
        "conv4": ({"backbone": {"name": "conv4"}}, "backbone=conv4: compiling is measured to pay for an MLP only"),
        "gpu": ({"trainer": {**long_mlp["trainer"], "accelerator": "gpu"}}, "on a GPU"),
        "ddp": ({"trainer": {**long_mlp["trainer"], "devices": 2}}, "several processes"),
        "fdr": ({"trainer": {**long_mlp["trainer"], "fast_dev_run": 1}}, "fast_dev_run"),
    }
    for what, (change, reason) in eager.items():
        compiled, why = auto_compile({**long_mlp, **change}, ALGORITHMS["maml"])
        assert not compiled and reason in why and "algorithm.compile=true compiles anyway" in why, what
    assert not auto_compile(long_mlp, ALGORITHMS["reptile"])[0]
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    compiled, why = auto_compile(long_mlp, ALGORITHMS["maml"])
    assert not compiled and "no C++ compiler" in why
    check_compile(long_mlp, ALGORITHMS["maml"])  # auto is never refused: it picks only what runs


def test_compile_auto_goes_on_eagerly_when_compiling_fails_and_true_stops(monkeypatch):
    """A compile that fails (a broken compiler, say) under auto costs the speed-up, not the run."""
    batch = random_batch([5])

    def broken_compile(*args, **kwargs):
        raise RuntimeError("C++ compile error\n(the compiler's output)")

    monkeypatch.setattr(torch, "compile", broken_compile)
    for mode, survives in (("auto", True), (True, False)):
        model = small_learner("maml", MLP, [5], compile=mode)
        model.compile_mode = model.compiled = True  # as auto chooses for a long MLP run
        if not survives:
            with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):
                model.compiled_meta_loss_or_eager(batch)
            continue
        loss, _ = model.compiled_meta_loss_or_eager(batch)
        torch.testing.assert_close(loss, model.meta_loss(batch)[0])  # the eager meta-loss itself
        assert model.compiled is False  # later steps go straight to eager


def paper_msl_weights(steps: int, outer_step: int, msl_steps: int) -> torch.Tensor:
    """Antoniou et al.'s multi-step-loss weights, written from the reference on its own
    (HowToTrainYourMAMLPytorch, few_shot_learning_system.py `get_per_step_loss_importance_vector`),
    with the epoch counted in outer steps."""
    decay = 1.0 / steps / msl_steps
    floor = 0.03 / steps
    weights = [max(1.0 / steps - outer_step * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + outer_step * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return torch.tensor(weights, dtype=torch.float64)


def mamlpp_reference_loss(model, batch: Episode, outer_step: int, msl_steps: int, second_order: bool) -> torch.Tensor:
    """MAML++'s meta-loss, one task at a time, with the reference's per-step BatchNorm indexing:
    inner step k normalizes its support pass and the query pass after its update with the
    k-th set of BatchNorm weights (both net_forward calls of an inner step get num_step=k,
    few_shot_learning_system.py `forward`); set 0 is the module's own here."""
    from torch.func import functional_call

    steps = model.inner_steps
    weights = paper_msl_weights(steps, outer_step, msl_steps)
    named = dict(model.model.named_parameters())
    norm_names = [n for n in named if n.startswith("0.layers.") and n.split(".")[3] == "1"]  # [conv, BN, ReLU, pool]
    assert set(norm_names) == set(model.norm_names)

    def norms(k: int) -> dict:
        return {n: named[n] if k == 0 else model.step_norms[parameter_key(n)][k - 1] for n in norm_names}

    total = 0.0
    for t in range(batch.support_x.shape[0]):
        fast = {n: p for n, p in named.items() if n not in norm_names}
        task_loss = 0.0
        for k in range(steps):
            support = functional_call(model.model, {**fast, **norms(k)}, (batch.support_x[t],))
            grads = torch.autograd.grad(CE(support, batch.support_y[t]), list(fast.values()), create_graph=second_order)
            fast = {n: p - model.step_lrs[parameter_key(n)][k] * g for (n, p), g in zip(fast.items(), grads)}
            query = functional_call(model.model, {**fast, **norms(k)}, (batch.query_x[t],))
            task_loss = task_loss + weights[k] * CE(query, batch.query_y[t])
        total = total + task_loss
    return total / batch.support_x.shape[0]


@pytest.mark.parametrize("outer_step", [3, 4, 7])
def test_mamlpp_meta_gradient_at_annealed_weights_and_across_the_order_switch(monkeypatch, outer_step):
    """Steps where the multi-step-loss weights are far from uniform, on both sides of the
    switch from first to second order (first_order_steps=4), against a reference that takes
    nothing from the learner but its parameters."""
    from metalab.algorithms.mamlpp import MAMLPlusPlus

    steps, shape, msl_steps = 3, [1, 8, 8], 8
    model = small_learner("mamlpp", TINY_CONV, shape, inner_steps=steps, msl_steps=msl_steps, first_order_steps=4)
    monkeypatch.setattr(MAMLPlusPlus, "global_step", property(lambda self: outer_step))
    with torch.no_grad():  # rates and norms that differ per step, so using the wrong step would show
        for rates in model.step_lrs.values():
            rates.uniform_(0.05, 0.5)
        for norms in model.step_norms.values():
            norms.add_(torch.randn_like(norms) * 0.3)
    weights = paper_msl_weights(steps, outer_step, msl_steps)
    assert weights.max() - weights.min() > 0.2  # far from uniform at these steps
    batch = random_batch(shape)
    second_order = outer_step >= 4
    reference = mamlpp_reference_loss(model, batch, outer_step, msl_steps, second_order)
    ours = assert_same_gradients(model, batch, reference)
    # The order matters to the gradient, so matching it checks the switch.
    other = gradients(mamlpp_reference_loss(model, batch, outer_step, msl_steps, not second_order), model.model)
    assert any((ours[f"model.{n}"] - g).abs().max() > 1e-6 for n, g in other.items())


@pytest.mark.parametrize("name", ["maml", "anil"])
def test_sum_over_shots_takes_finns_inner_step(name):
    """cbfinn/maml adapts on Σ_i xent_i / K over the N·K support examples (utils.py `xent`,
    summed by tf.gradients): with the same α that is N times the step of the mean loss."""
    alpha = 0.4
    model = small_learner(
        name, MLP, [5], inner_lr=alpha, inner_steps=1, eval_inner_steps=1, inner_loss="sum_over_shots"
    )
    batch = random_batch([5])
    adapted = model.adapt(batch.support_x, batch.support_y)
    net = model.head if name == "anil" else model.model  # ANIL adapts the head on the body's features
    for t in range(TASKS):
        inputs = model.body(batch.support_x[t]) if name == "anil" else batch.support_x[t]
        finn_loss = CE(net(inputs), batch.support_y[t], reduction="sum") / SHOTS
        grads = torch.autograd.grad(finn_loss, list(net.parameters()))
        for (n, p), g in zip(net.named_parameters(), grads):
            torch.testing.assert_close(adapted[n][t], (p - alpha * g).detach(), atol=1e-10, rtol=1e-10)


def test_inner_loss_reduction_is_checked_and_plain_sum_scales_by_the_examples():
    with pytest.raises(ConfigError, match="algorithm.inner_loss='total'"):
        small_learner("maml", MLP, [5], inner_loss="total")
    batch = random_batch([5])
    mean = small_learner("maml", MLP, [5], inner_loss="mean", inner_lr=0.1)
    summed = small_learner("maml", MLP, [5], inner_loss="sum", inner_lr=0.1 / (WAYS * SHOTS))
    for name, p in mean.adapt(batch.support_x, batch.support_y).items():
        torch.testing.assert_close(summed.adapt(batch.support_x, batch.support_y)[name], p)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_adapt_norm_false_meta_learns_batchnorm_without_adapting_it(checkpointed):
    shape = [1, 8, 8]
    model = small_learner("maml", TINY_CONV, shape, adapt_norm=False, checkpoint_inner_steps=checkpointed)
    batch = random_batch(shape)
    norm_names = model.norm_names
    assert norm_names
    adapted = model.adapt(batch.support_x, batch.support_y)
    for n in norm_names:  # the same for every task: θ's own
        torch.testing.assert_close(adapted[n], dict(model.model.named_parameters())[n].expand_as(adapted[n]))
    others = [n for n, _ in model.model.named_parameters() if n not in norm_names]
    reference = per_task_meta_loss(model.model, batch, 2, lambda k, n: 0.3, False, CE, adapted_names=others)
    ours = assert_same_gradients(model, batch, reference)
    assert all(ours[f"model.{n}"].abs().sum() > 0 for n in norm_names)  # still meta-learned


def test_reptile_minibatches_are_consecutive_slices_of_reshuffled_passes():
    """supervised-reptile `_mini_batches` (replacement=False): every pass over the support set
    shows each example once; a minibatch may run on into the next pass."""
    from metalab.algorithms.inner_loop import minibatch_indices

    indices = minibatch_indices(3, 10, 5, 4, torch.Generator().manual_seed(0))  # 20 draws: two passes of 10
    assert indices.shape == (3, 5, 4)
    for task in indices.flatten(1):
        assert sorted(task[:10].tolist()) == list(range(10)) and sorted(task[10:].tolist()) == list(range(10))
    assert not torch.equal(indices[0], indices[1])  # each task its own order


def reptile_with_shared_adam(**extra):
    return small_learner(
        "reptile",
        MLP,
        [5],
        inner_steps=3,
        eval_inner_steps=4,
        inner_lr=0.01,
        inner_optimizer="adam",
        adam_beta1=0.0,
        adam_beta2=0.999,
        inner_adam_state="shared",
        inner_batch_size=4,
        eval_inner_batch_size=None,
        **extra,
    )


def test_reptile_shared_adam_state_carries_over_tasks_and_outer_steps_like_the_reference():
    """The reference adapts a meta-batch's tasks in turn with one Adam: the weights go back to θ
    before each task, the Adam moments and step count do not (reptile.py `train_step`)."""
    from metalab.algorithms.inner_loop import minibatch_indices, take_examples

    model = reptile_with_shared_adam()
    batch = random_batch([5])
    reference = small_learner("reptile", MLP, [5], inner_optimizer="adam", adam_beta1=0.0, adam_beta2=0.999)
    optimizer = torch.optim.Adam(reference.model.parameters(), lr=0.01, betas=(0.0, 0.999))
    theta = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    for outer_step in range(2):
        torch.manual_seed(10 + outer_step)
        adapted, _ = model.inner_adapt(batch.support_x, batch.support_y, 3, True, False, training=True)
        torch.manual_seed(10 + outer_step)  # the same minibatches, drawn as the learner draws them
        batches = minibatch_indices(TASKS, WAYS * SHOTS, 3, 4, None)
        for t in range(TASKS):
            with torch.no_grad():
                for n, p in reference.model.named_parameters():
                    p.copy_(theta[n])
            for i in range(3):
                x = take_examples(batch.support_x[t : t + 1], batches[t : t + 1, i])[0]
                y = take_examples(batch.support_y[t : t + 1], batches[t : t + 1, i])[0]
                optimizer.zero_grad()
                CE(reference.model(x), y).backward()
                optimizer.step()
            for n, p in reference.model.named_parameters():
                torch.testing.assert_close(
                    adapted[n][t], p.detach(), atol=1e-7, rtol=1e-6, msg=f"outer step {outer_step}, task {t}, {n}"
                )
    assert int(model.shared_adam.steps) == 2 * TASKS * 3
    # Evaluation starts every task from the trained state and leaves it as it was.
    state = {k: v.clone() for k, v in model.shared_adam.state_dict().items()}
    model.adapt(batch.support_x, batch.support_y)
    for k, v in model.shared_adam.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert "shared_adam.steps" in model.state_dict()  # kept in checkpoints: metalab-eval tests as training did


def test_reptile_non_transductive_evaluation_predicts_each_query_beside_the_support_set():
    shape = [1, 8, 8]
    model = small_learner(
        "reptile", TINY_CONV, shape, inner_optimizer="sgd", inner_lr=0.1, eval_inner_steps=2, transductive=False
    )
    batch = random_batch(shape)
    adapted = model.adapt(batch.support_x, batch.support_y)
    ours = model.predict_beside_support(adapted, batch.support_x, batch.query_x)
    from torch.func import functional_call

    for t in range(TASKS):
        params = {n: p[t] for n, p in adapted.items()}
        for q in range(batch.query_x.shape[1]):  # reptile.py `_test_predictions`: [train set, sample], last row
            alone = functional_call(
                model.model, params, (torch.cat([batch.support_x[t], batch.query_x[t, q : q + 1]]),)
            )
            torch.testing.assert_close(ours[t, q], alone[-1])
    transductive = model.predict(adapted, batch.query_x)
    assert (transductive - ours).abs().max() > 1e-3  # BatchNorm over the queries is a different prediction
    accuracy = model.evaluate(batch)["acc"]
    torch.testing.assert_close(accuracy, (ours.argmax(-1) == batch.query_y).double().mean(1).to(accuracy.dtype))


def test_metalab_eval_can_test_reptile_without_transduction():
    from metalab.eval import evaluation_config

    trained = {"algorithm": {"name": "reptile", "transductive": True}, "dataset": {"name": "omniglot"}}
    run = evaluation_config(
        {"ckpt_path": "last.ckpt", "transductive": False}, trained, [1, 28, 28], ["transductive=false"]
    )
    assert run["algorithm"]["transductive"] is False and trained["algorithm"]["transductive"] is True
    with pytest.raises(ConfigError, match="transductive applies to learners with that option"):
        evaluation_config(
            {"ckpt_path": "last.ckpt", "transductive": False},
            {"algorithm": {"name": "maml"}, "dataset": {"name": "omniglot"}},
            [1, 28, 28],
            ["transductive=false"],
        )


@pytest.mark.parametrize("name", ["maml", "mamlpp", "metasgd"])
@pytest.mark.parametrize("execution", ["per_task", "vmap"])
@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
def test_every_task_execution_and_memory_format_gives_the_loops_meta_gradient(name, execution, memory_format):
    # algorithm.task_execution and backbone.memory_format choose kernels, not numbers.
    model = small_learner(
        name,
        {**TINY_CONV, "memory_format": memory_format},
        [1, 8, 8],
        task_execution=execution,
        **({"msl_steps": 10, "first_order_steps": 0} if name == "mamlpp" else {}),
    )
    batch = random_batch([1, 8, 8])
    assert_same_gradients(model, batch, reference_meta_loss(model, batch))
    predictions = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x)
    auto = small_learner(
        name, TINY_CONV, [1, 8, 8], **({"msl_steps": 10, "first_order_steps": 0} if name == "mamlpp" else {})
    )
    torch.testing.assert_close(predictions, auto.predict(auto.adapt(batch.support_x, batch.support_y), batch.query_x))


@pytest.mark.parametrize("stride,pooled", [(1, 4), (2, 0)], ids=["snell-vinyals", "finn-strided"])
def test_conv4_runs_channels_last_on_a_cpu_with_the_plain_networks_numbers(stride, pooled):
    """backbone.memory_format=auto on a CPU: every block works in channels-last, a 1-channel image
    included (given a zero second channel), and pools before its ReLU; the features and every
    weight's gradient are those of the plain network, contiguous, ReLU then pool."""
    from metalab.backbones.conv4 import Conv4

    torch.manual_seed(0)
    fast = Conv4((1, 28, 28), hidden_channels=8, pooled_blocks=pooled, stride=stride, global_average=stride == 2)
    plain = Conv4(
        (1, 28, 28),
        hidden_channels=8,
        pooled_blocks=pooled,
        stride=stride,
        global_average=stride == 2,
        memory_format="contiguous",
    )
    plain.load_state_dict(fast.state_dict())
    layouts = []
    for block in fast.layers:
        block[1].register_forward_hook(  # BatchNorm's input: the convolution's output
            lambda module, args, out: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    x = torch.randn(6, 1, 28, 28)

    def plain_forward(x):  # the network as the papers write it
        for block in plain.layers:
            conv, norm, *rest = block
            x = torch.relu(norm(conv(x)))
            if isinstance(rest[0], torch.nn.MaxPool2d):  # a pooled block: [pool, ReLU]
                x = rest[0](x)
        return plain.pooled(x).flatten(1)

    ours, theirs = fast(x), plain_forward(x)
    assert layouts == [True] * 4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.pow(2).sum().backward()
    theirs.pow(2).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "first_order,double_backward,support_layout",
    [
        (False, "auto", "channels_last"),
        (False, "pytorch", "contiguous"),
        (True, "auto", "channels_last"),
        (True, "pytorch", "channels_last"),
    ],
    ids=["second-order", "second-order-pytorch-double-backward", "first-order", "first-order-pytorch"],
)
def test_only_a_pass_pytorchs_batch_norm_differentiates_twice_runs_contiguous(
    first_order, double_backward, support_layout
):
    """backbone.memory_format=auto on a CPU: every pass runs channels-last, except a second-order
    inner step's support pass whose BatchNorm double backward is PyTorch's
    (backbone.batch_norm_double_backward=pytorch), faster contiguous (backbones/layout.py)."""
    from metalab.backbones.conv4 import Conv4

    model = small_learner(
        "maml",
        {**TINY_CONV, "batch_norm_double_backward": double_backward},
        [1, 8, 8],
        first_order=first_order,
        task_execution="per_task",
    )
    conv4 = next(m for m in model.modules() if isinstance(m, Conv4))
    layouts = []
    conv4.layers[1][0].register_forward_hook(  # the second block's convolution, run in the pass's layout
        lambda module, args, out: layouts.append(
            "channels_last" if out.is_contiguous(memory_format=torch.channels_last) else "contiguous"
        )
    )
    batch = random_batch([1, 8, 8])
    tasks = batch.support_x.shape[0]
    adapted, _ = model.inner_adapt(batch.support_x, batch.support_y, 1, first_order, meta_gradient=True)
    support_layouts, layouts[:] = list(layouts), []
    model.predict(adapted, batch.query_x)
    assert support_layouts == [support_layout] * tasks
    assert layouts == ["channels_last"] * tasks


def test_unknown_task_execution_and_memory_format_are_refused():
    with pytest.raises(ConfigError, match="algorithm.task_execution='loop'"):
        small_learner("maml", MLP, [5], task_execution="loop")
    with pytest.raises(ConfigError, match="backbone.memory_format='nhwc'"):
        small_learner("maml", {**TINY_CONV, "memory_format": "nhwc"}, [1, 8, 8])


@pytest.mark.parametrize(
    "backbone, images, per_task_run",
    [
        ({}, 5, True),  # stride 1 on 28×28: 5 × 784 = 3,920 output positions a task
        ({}, 3, False),  # 2,352
        ({"pooled_blocks": 0, "stride": 2, "global_average": True}, 5, False),  # Finn's network: 980
        ({"pooled_blocks": 0, "stride": 2, "global_average": True}, 20, True),  # 3,920
    ],
)
def test_auto_runs_each_task_alone_only_where_its_first_convolution_is_large(backbone, images, per_task_run):
    """algorithm.task_execution=auto on a CPU: per task from PER_TASK_MIN_POSITIONS output positions
    of the first convolution, vmapped below it (measured faster there, docs/speed.md)."""
    from torch._C._functorch import is_batchedtensor

    from metalab.algorithms.inner_loop import PER_TASK_MIN_POSITIONS

    assert PER_TASK_MIN_POSITIONS == 3000
    model = small_learner("maml", {**TINY_CONV, **backbone}, [1, 28, 28])
    batched_inputs = []
    model.model.register_forward_pre_hook(lambda module, args: batched_inputs.append(is_batchedtensor(args[0])))
    x = torch.rand(2, images, 1, 28, 28, dtype=torch.float64)
    model.inner_adapt(x, torch.zeros(2, images, dtype=torch.long), 1, first_order=True, meta_gradient=False)
    assert batched_inputs == ([False, False] if per_task_run else [True])
