"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra 2016).

A query x̂ is labelled by attention over the support set S = {(x_i, y_i)}:

    P(y = k | x̂, S) = Σ_{i: y_i = k} a(x̂, x_i),    a(x̂, x_i) = softmax_i c(f(x̂), g(x_i)),

with c the cosine similarity and the loss −log P(y | x̂, S). `predict` returns
log P(y = k | x̂, S) as the logits (a log-softmax, so cross-entropy on it is that loss).

Without full context embeddings (`fce=false`) f = g = f' = the backbone, and the
prediction does not depend on the order of the support set. With them (`fce=true`):

- g(x_i, S) = h→_i + h←_i + g'(x_i): a bidirectional LSTM reads the support embeddings
  g'(x_i) in episode order, and its two hidden states are added to the embedding;
- f(x̂, S) = attLSTM(f'(x̂), g(S), K): starting from h_0 = f'(x̂), c_0 = 0, for k = 1..K
      r_{k-1} = Σ_i softmax_i(h_{k-1}ᵀ g(x_i)) g(x_i)                (read the support set)
      ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1}),   h_k = ĥ_k + f'(x̂)
  and f = h_K. The LSTM's hidden input being the concatenation [h, r] is the same as
  an LSTM cell fed [f'(x̂), r] with hidden state h, which is how it is written here.

`similarity` chooses c:

- `cosine` (the paper's words): f(x̂)·g(x_i) / (|f(x̂)| |g(x_i)|);
- `support_cosine`: f(x̂)·g(x_i) / |g(x_i)|, the support embedding normalised only, as
  gitabcworld/MatchingNetworks (`models/DistanceNetwork.py`) and easyfsl
  (`easyfsl/methods/matching_networks.py`) compute it. The query's norm is then a
  temperature the embedding learns, so the attention can become as sharp as training wants;
  every support item is still scaled to one length, so no support image dominates by its norm.

`cosine_scale` (default 1: the paper) multiplies c before the softmax. With c ∈ [−1, 1]
(without FCE, [0, 1]: conv4's features are non-negative) the attention can never be
sharp: a 20-way 1-shot query gets at most e/(e + 19) ≈ 0.13 of its own class's
probability, and learning is slow (one CPU run: 57% vs 77% 20-way 1-shot test accuracy
after the same 200 Omniglot training episodes with scale 1 vs 10). A larger scale is a
temperature, not part of the paper. Its floor on the loss: with a two-sided cosine in
[0, 1], a query whose own class scores 1 and the others 0 still loses
log(1 + (N − 1)/e^scale), 0.90 at 5 ways and 2.1 at 20 with scale 1.

Both LSTMs run over whatever set they are given, so any ways/shots/queries work at test
time. The backbone is shared (f' = g'), as in the paper's image experiments.

BatchNorm: `algorithm.batch_norm` (algorithms/metric.py). The authors published no code;
the default `running` treats it as ProtoNet's reference code does (support and query
images in one training batch, running statistics at meta-test).
"""

from typing import Literal

import torch
from torch import Tensor, nn

from metalab.algorithms.metric import MetricLearner, one_hot_labels
from metalab.data.episodes import Episode
from metalab.errors import ConfigError, check_positive

SIMILARITIES = ("cosine", "support_cosine")


class MatchingNet(MetricLearner):
    def __init__(
        self,
        *,
        fce: bool = False,
        read_steps: int = 5,
        similarity: Literal["cosine", "support_cosine"] = "cosine",
        cosine_eps: float = 1e-8,
        cosine_scale: float = 1.0,
        **settings,
    ):
        """`fce`: full context embeddings, with `read_steps` (K) steps of the query's attention
        LSTM; `similarity`: cosine or support_cosine (the module docstring); `cosine_eps` keeps
        the norms off zero; `cosine_scale` multiplies the similarities before the softmax (1:
        the paper's). `settings`: MetricLearner's."""
        super().__init__(**settings)
        if similarity not in SIMILARITIES:
            raise ConfigError(
                f"algorithm.similarity={similarity!r} is unknown; use cosine (the paper's) or "
                "support_cosine (the support embedding normalised only)"
            )
        self.similarity = similarity
        self.backbone = self.build_embedding()
        self.fce = bool(fce)
        self.read_steps = read_steps
        self.eps = float(cosine_eps)
        self.scale = cosine_scale
        check_positive("algorithm.cosine_scale", self.scale, 1, integer=False, meaning="1 is the paper's attention")
        check_positive("algorithm.read_steps", self.read_steps, 5, meaning="the attention LSTM's K")
        dim = self.backbone.out_features
        if self.fce:
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * dim, dim)

    # ------------------------------------------------------------------ full context embeddings
    def context_support(self, support: Tensor) -> Tensor:
        """g(x_i, S) = h→_i + h←_i + g'(x_i) for [tasks, support, dim] embeddings g'."""
        hidden, _ = self.support_lstm(support)  # [tasks, support, 2·dim]: forward then backward states
        forward, backward = hidden.chunk(2, dim=-1)
        return forward + backward + support

    def context_query(self, query: Tensor, support: Tensor) -> Tensor:
        """f(x̂, S) = attLSTM(f'(x̂), g(S), K) for [tasks, queries, dim] embeddings f'."""
        tasks, queries, dim = query.shape
        h, c = query, torch.zeros_like(query)
        for _ in range(self.read_steps):
            attention = torch.softmax(h @ support.transpose(1, 2), dim=-1)  # [tasks, queries, support]
            read = attention @ support
            h, c = self.query_cell(torch.cat([query, read], -1).flatten(0, 1), (h.flatten(0, 1), c.flatten(0, 1)))
            h, c = h.view(tasks, queries, dim) + query, c.view(tasks, queries, dim)
        return h

    # ------------------------------------------------------------------ learner interface
    def adapt_one_hot(self, support_x: Tensor, support_one_hot: Tensor) -> tuple[Tensor, Tensor]:
        """(g(S) [tasks, support, dim], one-hot support labels [tasks, support, ways])."""
        return self.support_set(self.embed(self.backbone, support_x), support_one_hot)

    def support_set(self, support: Tensor, one_hot: Tensor) -> tuple[Tensor, Tensor]:
        """`adapt_one_hot` from the support embeddings g'(x_i)."""
        if self.fce:
            support = self.context_support(support)
        return support, one_hot.to(support.dtype)

    def predict(self, adapted: tuple[Tensor, Tensor], query_x: Tensor) -> Tensor:
        """[tasks, queries, ways] log P(y = k | x̂, S)."""
        return self.attend(adapted, self.embed(self.backbone, query_x))

    def attend(self, adapted: tuple[Tensor, Tensor], query: Tensor) -> Tensor:
        """`predict` from the query embeddings f'(x̂)."""
        support, one_hot = adapted
        if self.fce:
            query = self.context_query(query, support)
        # The epsilon keeps an all-zero embedding (possible after a ReLU) from dividing by zero.
        if self.similarity == "cosine":
            query = nn.functional.normalize(query, dim=-1, eps=self.eps)
        support = nn.functional.normalize(support, dim=-1, eps=self.eps)
        similarity = query @ support.transpose(1, 2)  # [tasks, queries, support]
        log_attention = torch.log_softmax(self.scale * similarity, dim=-1)
        # log Σ_{i: y_i = k} a_i, computed in log space: log 0 = −inf masks the other classes.
        return torch.logsumexp(log_attention.unsqueeze(-1) + one_hot.log().unsqueeze(1), dim=2)

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        support, query = self.embed_episode(self.backbone, batch.support_x, batch.query_x)
        log_probs = self.attend(self.support_set(support, one_hot_labels(batch.support_y)), query)
        loss = nn.functional.nll_loss(log_probs.flatten(0, 1), batch.query_y.flatten())
        return loss, {"acc": self.episode_metric(log_probs, batch.query_y)}
