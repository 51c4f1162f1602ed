"""The speed-only settings choose kernels, never numbers: every combination of
backbone.memory_format, backbone.batch_norm_double_backward, backbone.input_convolution and
algorithm.task_execution gives the optimization-based learners the same meta-loss, meta-gradient
and evaluation predictions, on the standard conv4 and on Finn et al.'s stride-2 network.

Each choice is also compared with a plain reference on its own (test_batch_norm.py,
test_input_convolution.py, test_optimization_family.py); here they are crossed, as the inner loop
hands them to the backbone together (ForwardOptions)."""

import itertools

import pytest
import torch
from test_optimization_family import TINY_CONV, random_batch, small_learner

CHOICES = {
    "memory_format": ("contiguous", "channels_last"),
    "batch_norm_double_backward": ("metalab", "pytorch"),
    "input_convolution": ("batched", "per_task"),
    "task_execution": ("per_task", "vmap"),
}
NETWORKS = {"standard": {}, "finn": {"pooled_blocks": 0, "stride": 2, "global_average": True}}
LEARNERS = {
    "maml": {},
    "anil": {},
    "metasgd": {},
    "mamlpp": {"msl_steps": 10, "first_order_steps": 0},  # second order, the multi-step loss on
    "reptile": {},
}


def outcome(name: str, network: dict, choices: dict) -> dict[str, torch.Tensor]:
    """The meta-loss, every meta-gradient and the evaluation predictions under `choices`."""
    backbone = {**TINY_CONV, **network, **{k: v for k, v in choices.items() if k != "task_execution"}}
    algorithm = {**LEARNERS[name], "task_execution": choices.get("task_execution", "auto")}
    model = small_learner(name, backbone, [1, 8, 8], **algorithm)
    batch = random_batch([1, 8, 8])
    loss, _ = model.meta_loss(batch)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    found = {"meta-loss": loss.detach()}
    found.update({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)})
    found["predictions"] = model.predict(model.adapt(batch.support_x, batch.support_y), batch.query_x).detach()
    return found


@pytest.mark.parametrize("network", NETWORKS, ids=NETWORKS)
@pytest.mark.parametrize("name", LEARNERS)
def test_every_combination_of_the_speed_settings_gives_the_same_numbers(name, network):
    defaults = outcome(name, NETWORKS[network], {})  # every setting at auto
    for combination in itertools.product(*CHOICES.values()):
        choices = dict(zip(CHOICES, combination))
        found = outcome(name, NETWORKS[network], choices)
        assert found.keys() == defaults.keys()
        for key, value in found.items():
            torch.testing.assert_close(value, defaults[key], rtol=1e-6, atol=1e-6, msg=f"{key} under {choices}")
