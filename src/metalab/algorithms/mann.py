"""Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra, Lillicrap 2016),
and its memoryless LSTM baseline.

Episodes are sequences (data/sequences.py): at step t the learner sees image x_t and the
one-hot label y_{t-1} of the previous step (zeros at t = 1) and predicts y_t. Its state, the
controller's (h, c) and the external memory, starts blank in every episode and is carried
from step to step within it, so the only way to answer a class's 2nd, 3rd, ... showing is to
have bound an earlier image of it to its label.

Controller (both learners): an LSTM over [f(x_t), y_{t-1}, r_{t-1}] where f is the shared
backbone (conv4 or MLP) and r_{t-1} the previous step's read vectors (MANN only):

    h_t, c_t = LSTM([f(x_t), y_{t-1}, r_{t-1}], (h_{t-1}, c_{t-1}))
    p(y_t | ...) = softmax(W_o [h_t, r_t] + b_o)          (LSTM baseline: softmax(W_o h_t + b_o))

MANN memory M_t ∈ R^{N×W} (N slots of width W), with R read heads; head i emits a key
k_t^i = tanh(W_k^i h_t) and a gate α_t^i = W_α^i h_t (the learned interpolation gate).
In the paper's equations head i writes its key (`algorithm.add_vector=false`, the paper
experiment config); `algorithm.add_vector=true`, the `algorithm=mann` default, writes a separate
add vector a_t^i = tanh(W_a^i h_t) instead, as tristandeleu/ntm-one-shot does (mann/model.py,
line 59), which learned much faster on Omniglot sequences (docs/results.md, memory-based
results; results/mann_omniglot_5w10i*.json). The paper reads with β_t = 1
(`algorithm.key_strength=false`); `algorithm.key_strength=true`, the `algorithm=mann` default
(measured better together with the add vector), adds the Neural Turing Machine's learned key
strength β_t = 1 + softplus(W_β h_t), which lets a read focus on one slot. Least-recently-used
access (LRUA), per step, following tristandeleu/ntm-one-shot mann/model.py lines 63-72:

    lu_{t-1}(i) = the slot of i-th smallest usage w^u_{t-1}     each head its own least-used slot
    w^w_t^i = σ(α_t^i) w^r_{t-1}^i + (1 − σ(α_t^i)) e_{lu_{t-1}(i)}   write to the last-read slot or it
    M_t = M_{t-1} with row lu_{t-1}(1) set to zero + Σ_i w^w_t^i (k_t^i or a_t^i)ᵀ
                                     (the paper: "the least used memory location ... is set to zero")
    w^r_t^i(j) = softmax_j( β_t K(k_t^i, M_t(j)) ),  K = cosine similarity   read by content
    r_t^i = Σ_j w^r_t^i(j) M_t(j)
    w^u_t = γ w^u_{t-1} + Σ_i (w^r_t^i + w^w_t^i)            usage, decaying by γ

Training minimises the cross-entropy of every step's prediction, averaged over the steps and
episodes, by backpropagation through time, with the gradient norm clipped (`algorithm.grad_clip`)
since recurrent gradients can explode.

Encoder f: the paper feeds raw 20×20 pixels, which is `backbone=mlp backbone.hidden_sizes=[]`
(an MLP without hidden layers only flattens), as the paper experiments
(conf/experiment/mann_omniglot_5w10i.yaml) do: on a CPU it is about ten times faster per step
than conv4, the Omniglot default that `algorithm=mann dataset=omniglot` alone gets. A conv4
encoder is applied per episode (vmap), so its batch statistics are the episode's own.

For the application API: `adapt(support)` runs the labelled sequence and returns the final
state, holding the sequence's last label as the next y_{t-1}; `predict(state, query)`
classifies each query as the next step of that sequence, all from the same state: queries do
not see each other and the state is not advanced. Each query gets the last label, not a blank
one, because that is what every step after the first saw in training, and because the last
image is bound to its label only at the step that follows it.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from metalab.algorithms.base import MetaLearner
from metalab.algorithms.inner_loop import map_tasks
from metalab.data.episodes import Episode
from metalab.data.sequences import instance_numbers, offset_labels
from metalab.errors import ConfigError
from metalab.evaluation import mean_and_ci95

MEMORY_INIT = 1e-6  # a blank memory; nonzero so cosine similarity is defined from the first read


class State(NamedTuple):
    """A batch of sequence states (batch first). The memory fields are None for the LSTM baseline."""

    h: Tensor  # [B, hidden]
    c: Tensor  # [B, hidden]
    memory: Tensor | None = None  # [B, slots, width]
    usage: Tensor | None = None  # [B, slots]: w^u
    read_weights: Tensor | None = None  # [B, heads, slots]: w^r
    reads: Tensor | None = None  # [B, heads * width]: r
    next_label: Tensor | None = None  # [B, ways]: after `adapt`, the sequence's last label, y_{t-1} of what follows


def least_used(usage: Tensor, count: int) -> Tensor:
    """[B, count, slots]: row i one-hot at the slot of i-th smallest usage (ties broken by topk).

    Head i's least-used slot, as tristandeleu/ntm-one-shot's `argsort(wu_tm1)[:, :nb_reads]`
    (mann/model.py, line 63): the R heads write to R different slots.
    """
    slots = torch.topk(-usage, count, dim=-1).indices  # sorted: the least used first
    return nn.functional.one_hot(slots, usage.shape[-1]).to(usage.dtype)


def lrua_write(
    memory: Tensor, usage: Tensor, read_weights: Tensor, values: Tensor, gate: Tensor
) -> tuple[Tensor, Tensor]:
    """One LRUA write: (new memory [B, N, W], write weights [B, R, N]).

    memory [B, N, W]; usage and read_weights from the previous step ([B, N], [B, R, N]);
    values [B, R, W], what head i writes (its key, or its add vector); gate σ(α) in [0, 1], [B, R, 1].
    Head i writes to its last-read slot or its own least-used one; only the single least-used
    slot is erased first (tristandeleu/ntm-one-shot mann/model.py lines 66-72).
    """
    unused = least_used(usage, values.shape[1])  # [B, R, N]
    write_weights = gate * read_weights + (1 - gate) * unused
    memory = memory * (1 - unused[:, 0]).unsqueeze(-1) + write_weights.transpose(1, 2) @ values
    return memory, write_weights


def content_read(memory: Tensor, keys: Tensor, strength: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(read weights [B, R, N], read vectors [B, R, W]): softmax over slots of cosine(key, slot),
    the cosines multiplied by `strength` [B, R, 1] when given."""
    unit = nn.functional.normalize  # x / max(‖x‖, eps): cosine similarity as one batched product
    similarity = unit(keys, dim=-1, eps=1e-8) @ unit(memory, dim=-1, eps=1e-8).transpose(1, 2)
    if strength is not None:
        similarity = similarity * strength
    weights = similarity.softmax(-1)
    return weights, weights @ memory


class Controller(nn.Module):
    """The recurrent core of both learners: one LSTM step, plus the memory when `slots` > 0."""

    def __init__(
        self,
        features: int,
        ways: int,
        hidden: int,
        slots: int,
        width: int,
        heads: int,
        usage_decay: float,
        key_strength: bool,
        add_vector: bool,
    ):
        super().__init__()
        self.ways, self.slots, self.width, self.heads, self.usage_decay = ways, slots, width, heads, usage_decay
        reads = heads * width if slots else 0
        self.lstm = nn.LSTMCell(features + ways + reads, hidden)
        if slots:
            self.key = nn.Linear(hidden, heads * width)
            self.gate = nn.Linear(hidden, heads)
            self.strength = nn.Linear(hidden, heads) if key_strength else None
            self.add = nn.Linear(hidden, heads * width) if add_vector else None
        self.out = nn.Linear(hidden + reads, ways)

    def initial_state(self, batch: int, like: Tensor) -> State:
        zeros = like.new_zeros
        state = State(h=zeros(batch, self.lstm.hidden_size), c=zeros(batch, self.lstm.hidden_size))
        if not self.slots:
            return state
        return state._replace(
            memory=zeros(batch, self.slots, self.width) + MEMORY_INIT,
            usage=zeros(batch, self.slots),
            read_weights=zeros(batch, self.heads, self.slots),
            reads=zeros(batch, self.heads * self.width),
        )

    def forward(self, state: State, features: Tensor, previous_label: Tensor) -> tuple[Tensor, State]:
        """(logits [B, ways] for this step's image, the next state), given f(x_t) and one-hot y_{t-1}."""
        inputs = [features, previous_label] + ([state.reads] if self.slots else [])
        h, c = self.lstm(torch.cat(inputs, -1), (state.h, state.c))
        if not self.slots:
            return self.out(h), State(h, c)
        batch = h.shape[0]
        keys = torch.tanh(self.key(h)).view(batch, self.heads, self.width)
        gate = torch.sigmoid(self.gate(h)).unsqueeze(-1)
        # The paper writes the key itself; tristandeleu/ntm-one-shot a separate add vector (model.py line 59).
        values = keys if self.add is None else torch.tanh(self.add(h)).view(batch, self.heads, self.width)
        memory, write_weights = lrua_write(state.memory, state.usage, state.read_weights, values, gate)
        # Optional NTM-style key strength β = 1 + softplus(W_β h) >= 1 sharpens the read (not in the paper).
        strength = None if self.strength is None else 1 + nn.functional.softplus(self.strength(h)).unsqueeze(-1)
        read_weights, reads = content_read(memory, keys, strength)
        usage = self.usage_decay * state.usage + read_weights.sum(1) + write_weights.sum(1)
        reads = reads.flatten(1)
        logits = self.out(torch.cat([h, reads], -1))
        return logits, State(h, c, memory, usage, read_weights, reads)


class SequenceLearner(MetaLearner):
    """Shared mechanics of the sequence learners: encode, unroll the controller, score by instance."""

    fixed_ways = True  # one output per label
    task_types = ("classification",)
    # Trained on shuffled sequences: the application API shuffles a user's support set the same way.
    reads_sequences = True

    def __init__(
        self, *, hidden_size: int = 200, memory: tuple | None = None, grad_clip: float | None = 10.0, **common
    ):
        """`hidden_size`: the LSTM controller's; `memory`: the external memory's (slots, width,
        read heads, usage decay, key strength, add vector), which MANN sets from its settings;
        None for the LSTM baseline. `common`: MetaLearner's arguments (`ways`: one output per label)."""
        super().__init__(grad_clip=grad_clip, **common)
        self.backbone = self.backbone_network()
        no_memory = (0, 0, 0, 0.0, False, False)
        self.controller = Controller(self.backbone.out_features, self.ways, hidden_size, *(memory or no_memory))

    @classmethod
    def check_run_config(cls, config: dict) -> None:
        episodes = config["dataset"].get("episodes", "few_shot")
        if episodes != "sequence":
            raise ConfigError(
                f"algorithm={config['algorithm'].get('name')} learns from sequences, but "
                f"dataset.episodes={episodes}; set dataset.episodes=sequence"
            )

    def encode(self, x: Tensor) -> Tensor:
        # One episode per vmap slice: a conv4 backbone normalizes with that episode's statistics.
        return map_tasks(self.backbone, x)

    def unroll(self, x: Tensor, y: Tensor) -> tuple[Tensor, State]:
        """(logits [B, T, ways], the state after the last step) for sequences x [B, T, ...], labels y [B, T]."""
        features = self.encode(x)
        previous_labels = offset_labels(y, self.ways).to(features.dtype)  # step t sees y_{t-1}, never y_t
        state = self.controller.initial_state(x.shape[0], features)  # memory wiped for every episode
        logits = []
        for t in range(x.shape[1]):
            step_logits, state = self.controller(state, features[:, t], previous_labels[:, t])
            logits.append(step_logits)
        return torch.stack(logits, 1), state

    def sequence_metrics(self, logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per episode: accuracy over the sequence, and on each class's k-th showing (acc_inst<k>)."""
        correct = (logits.argmax(-1) == y).float()
        instance = instance_numbers(y)
        metrics = {"acc": correct.mean(-1)}
        for k in range(1, int(instance.max()) + 1):
            shown = (instance == k).float()
            metrics[f"acc_inst{k}"] = (correct * shown).sum(-1) / shown.sum(-1)
        return metrics

    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_labels(batch.support_y)
        logits, _ = self.unroll(batch.support_x, batch.support_y)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.support_y.flatten())
        return loss, self.sequence_metrics(logits, batch.support_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> State:
        """The state after reading the labelled sequence, the last label pending as the next y_{t-1}."""
        self._check_labels(support_y)
        return self._pending_last_label(self.unroll(support_x, support_y)[1], support_y)

    def predict(self, state: State, query_x: Tensor) -> Tensor:
        """[B, Q, ways]: each query classified as the next step after the sequence, all from one state."""
        batch, queries = query_x.shape[:2]
        features = self.encode(query_x).flatten(0, 1)
        # Copy the state once per query, so queries neither see each other nor advance it.
        copies = State(*(None if part is None else part.repeat_interleave(queries, 0) for part in state))
        logits, _ = self.controller(copies, features, copies.next_label)
        return logits.view(batch, queries, self.ways)

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        self._check_labels(batch.support_y)
        logits, state = self.unroll(batch.support_x, batch.support_y)
        metrics = self.sequence_metrics(logits, batch.support_y)
        if batch.query_x.shape[1]:
            state = self._pending_last_label(state, batch.support_y)  # = adapt(support), unrolled once
            metrics["acc_query"] = self.episode_metric(self.predict(state, batch.query_x), batch.query_y)
        return metrics

    def on_test_epoch_end(self) -> None:
        # Accuracy against instance number as a TensorBoard curve (x axis: the instance), next to
        # the test/acc_inst<k> scalars the base logs at the training step.
        curve = sorted(
            (int(name.removeprefix("acc_inst")), mean_and_ci95(values)[0])
            for name, values in self.stage_values().items()
            if name.startswith("acc_inst")
        )
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_scalar"):  # TensorBoard's SummaryWriter
                for k, accuracy in curve:
                    logger.experiment.add_scalar("test_by_instance/acc", float(accuracy), global_step=k)
        super().on_test_epoch_end()

    def _pending_last_label(self, state: State, y: Tensor) -> State:
        return state._replace(next_label=nn.functional.one_hot(y[:, -1], self.ways).to(state.h.dtype))

    def _check_labels(self, y: Tensor) -> None:
        if y.numel() and int(y.max()) >= self.ways:
            raise ConfigError(
                f"a sequence has label {int(y.max())}, but algorithm={self.algorithm_name} "
                f"was built with ways={self.ways} outputs; use sequences of ways={self.ways} classes"
            )


class MANN(SequenceLearner):
    """LSTM controller with an external memory written by LRUA and read by cosine similarity."""

    # Checkpoints written before add_vector existed wrote the key itself, as add_vector=false does.
    settings_of_older_checkpoints = {"add_vector": False}

    def __init__(
        self,
        *,
        memory_slots: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        usage_decay: float = 0.95,
        key_strength: bool = True,
        add_vector: bool = True,
        **settings,
    ):
        """The memory's `memory_slots` × `memory_width`, its `read_heads` (each also writes),
        the usage weights' `usage_decay` γ, whether a learned `key_strength` sharpens the cosine
        read, and whether writes add a separate `add_vector` (module docstring). `settings`:
        SequenceLearner's (`hidden_size`)."""
        if not 0 < read_heads <= memory_slots:
            raise ConfigError(
                f"algorithm.read_heads={read_heads} must be between 1 and algorithm.memory_slots="
                f"{memory_slots}: every head writes to its own least-used slot"
            )
        memory = (memory_slots, memory_width, read_heads, usage_decay, key_strength, bool(add_vector))
        super().__init__(memory=memory, **settings)


class LSTMBaseline(SequenceLearner):
    """The same controller without the memory: the paper's LSTM baseline (its only setting: `hidden_size`)."""

    def __init__(self, **settings):
        super().__init__(memory=None, **settings)
