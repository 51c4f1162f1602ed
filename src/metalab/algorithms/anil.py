"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals 2019).

The network is a body f_φ (the backbone) and a linear head with weights w. Only the head
adapts to a task; the body is learned by the outer loop alone:

    w'_i = w − α ∇w L(w; f_φ(S_i))                    (inner loop, head only)
    (φ, w) ← (φ, w) − β ∇(φ,w) Σ_i L(w'_i; f_φ(Q_i))   (outer loop)

The body runs once per task instead of once per inner step, which is most of the saving.
"""

from torch import Tensor

from metalab.algorithms.inner_loop import Params, batched_forward, batched_loss, map_tasks, per_task, sgd_adapt
from metalab.algorithms.maml import MAML


class ANIL(MAML):
    compilable = False  # torch.compile fails on it inside AOTAutograd ("Cannot access storage of TensorWrapper")

    def __init__(self, **settings):
        """MAML's settings (conf/algorithm/anil.yaml) but two: its own inner loop adapts the head
        only, so the normalization's adaptation and inner-step checkpointing do not apply."""
        super().__init__(adapt_norm=False, checkpoint_inner_steps=False, **settings)
        self.body, self.head = self.model[0], self.model[1]
        # The head is one linear layer, which task_execution=auto vmaps (one batched matmul).
        self.forward_head = batched_forward(self.head, self.task_execution())
        self.head_loss = batched_loss(self.head, self.task_loss_fn(), **self.inner_loss_reduction())

    def inner_adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool, meta_gradient: bool
    ) -> tuple[Params, Tensor | None]:
        features = map_tasks(self.body, support_x)  # one task per slice: its own normalization statistics
        head = per_task(dict(self.head.named_parameters()), support_x.shape[0], meta_gradient)
        return sgd_adapt(self.head_loss, head, features, support_y, steps, self.inner_learning_rate(), first_order)

    def predict(self, adapted_head: Params, query_x: Tensor) -> Tensor:
        return self.forward_head(adapted_head, map_tasks(self.body, query_x))
