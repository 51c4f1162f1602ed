"""Meta-SGD (Li, Zhou, Chen, Li 2017).

The inner learning rate is a learned tensor α of the same shape as each parameter, so
the inner update picks both a direction and a step size per element:

    θ'_i = θ − α ∘ ∇θ L(θ; S_i)
    (θ, α) ← (θ, α) − β ∇(θ,α) Σ_i L(θ'_i; Q_i)

α is meta-learned with the initialization; it starts at `inner_lr` everywhere.
"""

import torch
from torch import Tensor, nn

from metalab.algorithms.inner_loop import parameter_key
from metalab.algorithms.maml import MAML


class MetaSGD(MAML):
    def __init__(self, *, eval_inner_steps: int = 1, **settings):
        """MAML's settings (conf/algorithm/metasgd.yaml); `inner_lr` is α's starting value."""
        super().__init__(eval_inner_steps=eval_inner_steps, **settings)
        self.inner_lrs = nn.ParameterDict(
            {
                parameter_key(name): nn.Parameter(torch.full_like(p, self.inner_lr))
                for name, p in self.model.named_parameters()
            }
        )

    def inner_learning_rate(self) -> dict[str, Tensor]:
        return {name: self.inner_lrs[parameter_key(name)] for name, _ in self.model.named_parameters()}
