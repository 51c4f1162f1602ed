"""Learners built from Python, as a library: the paper settings by default (the constructors'
defaults, equal to conf/algorithm/*.yaml: tests/test_config.py), any `nn.Module` as the backbone
where the learner allows it, and no Hydra config or conf/ directory needed."""

import pytest
import torch
from torch import nn

from metalab.algorithms.maml import MAML
from metalab.algorithms.protonet import ProtoNet
from metalab.algorithms.relationnet import RelationNet
from metalab.data.episodes import Episode
from metalab.errors import ConfigError


def episodes(tasks=2, ways=5, shots=1, queries=2, shape=(1, 28, 28)) -> Episode:
    """Random images, labels 0..ways-1 in every task."""
    labels = torch.arange(ways).repeat_interleave
    return Episode(
        support_x=torch.rand(tasks, ways * shots, *shape),
        support_y=labels(shots).expand(tasks, -1).clone(),
        query_x=torch.rand(tasks, ways * queries, *shape),
        query_y=labels(queries).expand(tasks, -1).clone(),
    )


def one_outer_step(learner) -> float:
    """One step of the learner's own outer optimizer on its meta-loss; returns how far the weights moved."""
    built = learner.configure_optimizers()
    optimizer = built["optimizer"] if isinstance(built, dict) else built
    before = [p.detach().clone() for p in learner.parameters()]
    loss, metrics = learner.meta_loss(episodes())
    assert torch.isfinite(loss) and set(metrics) >= {"acc"}
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return max((p.detach() - b).abs().max().item() for p, b in zip(learner.parameters(), before))


def small_module() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU())


def test_protonet_takes_any_module_as_its_backbone_and_trains_a_step():
    module = small_module()
    learner = ProtoNet(backbone=module)  # no input_shape: prototypes need no feature size
    assert learner.backbone is module and learner.scheduler_cfg["step_size"] == 2000  # the paper's schedule
    assert one_outer_step(learner) > 0
    predictions = learner.predict(learner.adapt(episodes().support_x, episodes().support_y), episodes().query_x)
    assert predictions.shape == (2, 10, 5)


def test_maml_takes_a_module_and_a_setting_and_trains_a_step():
    learner = MAML(backbone=small_module(), inner_lr=0.4, ways=5, input_shape=[1, 28, 28])
    assert learner.inner_lr == 0.4 and learner.inner_steps == 1 and learner.eval_inner_steps == 10  # maml.yaml's
    assert learner.model[1].in_features == 32  # measured on input_shape: the module does not say it
    assert one_outer_step(learner) > 0


def test_a_backbone_config_by_name_takes_its_yamls_settings():
    learner = MAML(backbone={"name": "conv4", "hidden_channels": 8}, input_shape=[1, 28, 28], ways=5)
    convolutions = [m for m in learner.model[0].modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 4 and convolutions[-1].out_channels == 8  # blocks: conv4.yaml's 4
    assert one_outer_step(learner) > 0


def test_what_a_learner_cannot_do_without_is_asked_for_by_name():
    with pytest.raises(ConfigError, match="give ways"):
        MAML(backbone=small_module())
    with pytest.raises(ConfigError, match="give input_shape"):
        MAML(backbone=small_module(), ways=5)
    with pytest.raises(ConfigError, match="needs input_shape"):
        ProtoNet(backbone={"name": "conv4"})
    with pytest.raises(ConfigError, match="not a module"):
        RelationNet(backbone=small_module())
