"""What every meta-learner shares: the outer step, logging, and the evaluation protocol.

A learner subclasses `MetaLearner` and writes three methods, each over a meta-batch of
episodes (tensors shaped [tasks, examples, ...]):

- `meta_loss(batch)` -> (loss to minimise, {metric: per-episode values}) for training;
- `adapt(support_x, support_y)` -> the learner's adapted state for each task (adapted
  weights, class prototypes, a filled memory, ...), computed once;
- `predict(adapted, query_x)` -> [tasks, queries, outputs] logits or regression outputs.

Evaluation on fixed validation/test episodes is `predict(adapt(support), query)` scored
per episode (`evaluate`, which a learner may extend with extra metrics), and the
application API (metalab.api) calls the very same two methods, so a user's predictions
are computed exactly as the benchmark numbers are.

Everything else (optimizer and scheduler from config, gradient clipping through
Lightning's manual-optimization API, tasks per second, mean and 95% CI over the fixed
episodes, Lightning's inference mode) is handled here once.
"""

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from hydra.utils import instantiate
from lightning import LightningModule
from torch import Tensor, nn

from metalab import __version__
from metalab.algorithms.compile_passes import auto_compile, inductor_options
from metalab.backbones import build_backbone
from metalab.checkpoint import MARKER, read_checkpoint
from metalab.data.episodes import Episode
from metalab.errors import ConfigError, TrainingDiverged, metalab_class
from metalab.evaluation import mean_and_ci95
from metalab.run_log import log
from metalab.settings import SHARED_ALGORITHM_KEYS, check_group_keys, with_group_defaults


@contextmanager
def evaluation_mode() -> Iterator[None]:
    """What meta-test adaptation runs under, in evaluation and in the application API.

    Out of inference mode (trainer.validate/test enter it by default, and the inner loop
    cannot take gradients there) and with gradients off: no graph to the meta-parameters
    is needed, and an inner loop turns gradients back on for its own steps (inner_loop.py).
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


# The outer optimizer every learner's yaml names unless its paper used another (read-only: a default).
ADAM = MappingProxyType({"_target_": "torch.optim.Adam", "lr": 0.001})

# task type -> (the metric every learner reports on it, whether higher or lower is better): the one
# source; dataset.metric and dataset.metric_mode (what checkpointing and sweeps monitor) must agree.
METRICS = {"classification": ("acc", "max"), "regression": ("mse", "min")}

_EPISODE = "__episode__"  # the episode indices' key beside the metrics while they are gathered


class MetaLearner(LightningModule):
    # True when the output layer is sized to the training ways (MAML's head): then
    # evaluation must use the same number of ways.
    fixed_ways: bool = False
    # The kinds of dataset the learner can meta-train on.
    task_types: tuple[str, ...] = ("classification", "regression")
    # True when the support set is read as a sequence, in order (the memory learners).
    reads_sequences: bool = False
    # True when `meta_loss` is a pure function of the parameters that torch.compile can
    # capture whole, so algorithm.compile=true may be set (see compiled_meta_loss).
    compilable: bool = False
    # Settings the learner fixes by definition: {key: (the only value, why)}. Another value
    # in the config is refused before any work (validation.check_algorithm_keys), not ignored.
    fixed_settings: dict[str, tuple[Any, str]] = {}
    # Settings added after checkpoints of this learner were first written, with the value such a
    # checkpoint was trained with where it differs from the yaml's default today (which would
    # otherwise be filled in): `from_checkpoint` applies them to a stored config
    # that lacks the setting, so an older checkpoint loads and predicts as it did.
    settings_of_older_checkpoints: dict[str, Any] = {}

    def __init__(
        self,
        *,
        backbone: Mapping | nn.Module,
        input_shape: Sequence[int] | None = None,
        task_type: str = "classification",
        ways: int | None = None,
        optimizer: Mapping = ADAM,
        scheduler: Mapping | None = None,
        grad_clip: float | None = None,
        eval_seed: int = 0,
        compile: bool | str = False,
        run_config: dict | None = None,
    ):
        """What every learner takes, beside its own settings (which its subclass names):

        - `backbone`: the backbone's config (conf/backbone/<name>.yaml; `{"name": "conv4"}` takes
          the yaml's settings), built by the learner for `input_shape` (e.g. [1, 28, 28]); or a
          built `nn.Module` mapping a batch of inputs to flat features, where the learner allows
          one (`input_shape` is then needed only where the feature size must be measured);
        - `optimizer`, `scheduler`: the outer loop's, as Hydra configs (`_target_` and arguments;
          `scheduler` null for none), built in `configure_optimizers`; `grad_clip`: the
          meta-gradient's norm limit, or null; the defaults are the learner's paper settings,
          its conf/algorithm/<name>.yaml (tests/test_config.py keeps the two equal);
        - `task_type`: classification or regression; `ways`: the training ways, for learners
          whose output layer is sized to them (MAML's head, MANN's labels);
        - `eval_seed`: fixes the random draws of meta-test adaptation (Reptile's and the
          baselines' minibatches), the same for every checkpoint;
        - `compile`: false, true, "reduce-overhead", or "auto" (compile_passes.auto_compile decides from
          `run_config`'s trainer settings);
        - `run_config`: the whole run's config, stored in the checkpoint so that metalab-eval and
          metalab.load_learner rebuild the learner and its data from the file alone.

        `from_config` builds a learner from a run config (what metalab-train does)."""
        super().__init__()
        self.run_config = run_config
        # The checkpoint keeps the run config: metalab-eval rebuilds the learner and its data from it.
        shape = None if input_shape is None else list(input_shape)
        self.save_hyperparameters({"config": run_config, "input_shape": shape, "task_type": task_type})
        self.automatic_optimization = False
        # A built module is kept out of the module tree here (a tuple): the learner registers it
        # where it uses it, under the name its own parameters have.
        self.given_backbone = (backbone,) if isinstance(backbone, nn.Module) else ()
        self.backbone_cfg = None if self.given_backbone else dict(backbone)
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = None if scheduler is None else dict(scheduler)
        self.grad_clip = grad_clip
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.task_type = task_type
        self.ways = ways
        self.eval_seed = eval_seed
        self.metric = METRICS[task_type][0]
        self._eval_values: dict[str, list[Tensor]] = defaultdict(list)
        self._eval_indices: list[Tensor] = []  # the fixed episodes' indices, beside _eval_values
        self.eval_episodes: dict[str, int] = {}  # stage -> fixed episodes in its last summary
        # stage -> {"episode": [index, ...], "values": {metric: [value, ...]}} of its last summary,
        # in episode order: runs on the same fixed episodes can be compared episode by episode.
        self.eval_per_episode: dict[str, dict] = {}
        self._step_started = 0.0
        self.train_tasks = 0  # tasks meta-trained on by this process
        # Seconds spent in outer steps and their tasks, for tasks per second; the first outer
        # step of a process is left out: it warms up (allocations, kernels, torch.compile).
        self.train_time = 0.0
        self.timed_tasks = 0
        self._warm = False
        self.compile_mode = compile  # auto, false, true or "reduce-overhead"
        # auto: compiled where that was measured to pay (compile_passes.auto_compile); should compiling
        # fail there, the run goes on eagerly instead of stopping.
        self.compile_fallback = self.compile_mode == "auto"
        self.compile_choice = None  # auto's choice and why, for the run's log
        if self.compile_fallback and run_config is None:  # nothing to judge the run's length by
            self.compile_mode, self.compile_choice = False, "algorithm.compile=auto: eager, as no run config was given"
        elif self.compile_fallback:
            self.compile_mode, self.compile_choice = auto_compile(run_config, type(self))
        self.compiled = bool(self.compile_mode)
        self._meta_gradient = None  # the compiled meta-gradient, built at the first outer step

    @classmethod
    def from_config(cls, config: dict, input_shape: Sequence[int], task_type: str) -> "MetaLearner":
        """The learner a run config describes: `config["algorithm"]`'s settings (every one its
        conf/algorithm/<name>.yaml gives, filled in where a config written by hand leaves it out)
        as the constructor's keyword arguments, with the run's backbone, ways and eval_seed."""
        algorithm = with_group_defaults("algorithm", config["algorithm"])
        check_group_keys("algorithm", algorithm, SHARED_ALGORITHM_KEYS)  # a clear refusal, not a TypeError
        # Stored complete (the class each names included), so the checkpoint loads without conf/.
        run_config = {**config, "algorithm": algorithm, "backbone": with_group_defaults("backbone", config["backbone"])}
        cls.check_run_config(run_config)
        settings = {key: value for key, value in algorithm.items() if key not in ("name", "_target_")}
        return cls(
            **settings,
            backbone=run_config["backbone"],
            input_shape=input_shape,
            task_type=task_type,
            ways=config.get("ways"),
            eval_seed=0 if config.get("eval_seed") is None else config["eval_seed"],
            run_config=run_config,
        )

    @classmethod
    def from_checkpoint(cls, path, checkpoint: dict, config: dict | None = None) -> "MetaLearner":
        """The learner a checkpoint holds (`checkpoint` as checkpoint.read_checkpoint returns it), built
        from `config` (default: its stored run config) with its weights: the class the config's
        `algorithm._target_` names, which must be this class or one derived from it."""
        hyper = checkpoint["hyper_parameters"]
        config = hyper["config"] if config is None else config
        try:
            name, input_shape, task_type = config["algorithm"]["name"], list(hyper["input_shape"]), hyper["task_type"]
        except (KeyError, TypeError):
            raise ConfigError(
                f"ckpt_path={path} lacks the run config metalab stores; give a checkpoint written by metalab-train"
            ) from None
        try:  # only metalab's own learners: the stored _target_ cannot name anything else
            learner_cls = metalab_class(
                "algorithm._target_",
                config["algorithm"].get("_target_"),
                "metalab.algorithms",
                MetaLearner,
                "give a checkpoint written by metalab-train",
            )
        except ConfigError as error:
            raise ConfigError(f"ckpt_path={path}: {error}") from None
        if not issubclass(learner_cls, cls):
            raise ConfigError(f"ckpt_path={path} holds a {learner_cls.__name__}, not a {cls.__name__}")
        algorithm = {**learner_cls.settings_of_older_checkpoints, **config["algorithm"]}  # a stored setting wins
        try:
            model = learner_cls.from_config({**config, "algorithm": algorithm}, input_shape, task_type)
        except ConfigError as error:  # a stored setting the learner refuses: name the file it came from
            raise ConfigError(f"ckpt_path={path}: {error}") from None
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except (RuntimeError, KeyError) as error:
            first_line = str(error).splitlines()[0]
            raise ConfigError(
                f"ckpt_path={path}: its weights do not fit algorithm={name} as configured ({first_line})"
            ) from None
        return model

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **unsupported) -> "MetaLearner":
        """Lightning's way to load a checkpoint, through metalab's reader, which unpickles no
        objects (checkpoint.read_checkpoint): the stored run config rebuilds the learner."""
        if unsupported:
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint takes checkpoint_path and map_location only "
                f"(the learner is rebuilt from the run config stored in the file), not {', '.join(unsupported)}"
            )
        model = cls.from_checkpoint(checkpoint_path, read_checkpoint(checkpoint_path))
        return model if map_location is None else model.to(map_location)

    def backbone_network(self, backbone_cfg: Mapping | None = None, running_stats: bool = False) -> nn.Module:
        """The feature extractor: the module given as `backbone`, or the one `backbone_cfg` (default:
        the learner's backbone config) builds for `input_shape`, its BatchNorm keeping running
        statistics where `running_stats` (build_backbone)."""
        if self.given_backbone and backbone_cfg is None:
            return self.given_backbone[0]
        if self.input_shape is None:
            raise ConfigError(f"{type(self).__name__} needs input_shape (e.g. [1, 28, 28]) to build its backbone")
        return build_backbone(backbone_cfg or self.backbone_cfg, self.input_shape, running_stats=running_stats)

    def feature_size(self, backbone: nn.Module) -> int:
        """The size of the flat features `backbone` gives: its `out_features` (metalab's backbones say
        it), else measured on one zero input of `input_shape`."""
        size = getattr(backbone, "out_features", None)
        if isinstance(size, int):
            return size
        if self.input_shape is None:
            raise ConfigError(
                f"{type(self).__name__} needs the backbone's feature size: give input_shape (e.g. [1, 28, 28]) "
                "or a backbone with an `out_features` attribute"
            )
        with torch.no_grad():
            return backbone(torch.zeros(1, *self.input_shape)).flatten(1).shape[1]

    @classmethod
    def check_run_config(cls, config: dict) -> None:
        """Refuse a run this learner cannot take part in, before it is built (the memory learners
        need sequences). Default: any."""

    @property
    def algorithm_name(self) -> str:
        """The name the learner goes by in messages: its `algorithm=` choice."""
        name = ((self.run_config or {}).get("algorithm") or {}).get("name")
        return name or type(self).__name__.lower()

    @classmethod
    def settings_from_data(cls, config: dict, datamodule) -> None:
        """Fill in, or check, settings a learner takes from its training data, before it is built
        (metalab-train calls it once the data module is set up). Default: none; the transfer
        baselines size their classifier to the training split's classes (algorithms/baseline.py)."""

    # ------------------------------------------------------------------ to implement
    def meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Any:
        """Adapt to each task's labelled support set; the result is passed to `predict`.

        Classification labels are 0..ways-1 in every task.
        """
        raise NotImplementedError

    def predict(self, adapted: Any, query_x: Tensor) -> Tensor:
        """[tasks, queries, outputs]: class logits (classification) or predictions (regression)."""
        raise NotImplementedError

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """{metric: per-episode values} on fixed evaluation episodes."""
        predictions = self.predict(self.adapt(batch.support_x, batch.support_y), batch.query_x)
        return {self.metric: self.episode_metric(predictions, batch.query_y)}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss, metrics = self.compiled_meta_loss_or_eager(batch) if self.compiled else self.meta_loss(batch)
        # A learner whose optimized loss is a surrogate (Reptile) reports its real loss here.
        reported_loss = metrics.pop("loss", loss).detach().mean()
        self.check_finite(reported_loss, metrics.get("inner_loss"))
        # Exactly one backward per outer step: under DDP this is the one all-reduce.
        self.manual_backward(loss)
        if self.grad_clip is not None:
            self.clip_meta_gradients(optimizer)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if self.logs_step(self.global_step):  # the optimizer has stepped: global_step counts this step
            self.log("train/loss", reported_loss, prog_bar=True)
            for name, values in metrics.items():
                self.log(f"train/{name}", values.detach().mean(), prog_bar=name == self.metric)
            self.log("train/lr", optimizer.param_groups[0]["lr"])
        return loss.detach()

    def clip_meta_gradients(self, optimizer) -> None:
        """Clip the meta-gradient's norm at `grad_clip` over all parameters (a learner whose
        paper clips each network apart overrides this)."""
        self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def logs_step(self, step: int) -> bool:
        """Whether outer step `step` (counted from 1) logs its training scalars. Lightning writes
        them to the logger only every `trainer.log_every_n_steps` steps (every step under
        fast_dev_run), but each `self.log` call costs its time whether written or not: on a
        small model, more than the meta-gradient itself (docs/speed.md, "Logging"). So the
        other steps skip it, and what reaches the logger is unchanged. The first step of a
        process and the last step log as well, for the progress lines."""
        trainer = self._trainer
        if trainer is None:  # a learner stepped by hand: there is nothing to log to
            return False
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return (every > 0 and step % every == 0) or not self._warm or 0 < trainer.max_steps <= step

    def compiled_meta_loss_or_eager(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """`compiled_meta_loss`; under algorithm.compile=auto, `meta_loss` from now on if the first
        compile fails (a compiler that cannot build Inductor's code, say): auto promises speed, not
        a failure that algorithm.compile=false would not have."""
        first = self._meta_gradient is None
        try:
            return self.compiled_meta_loss(batch)
        except Exception as error:
            if not (self.compile_fallback and first):
                raise
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            log.warning(
                f"algorithm.compile=auto: torch.compile failed ({type(error).__name__}: {reason}); "
                "running eagerly (set algorithm.compile=false to skip the attempt)"
            )
            self.compiled, self._meta_gradient = False, None
            return self.meta_loss(batch)

    def compiled_meta_loss(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """`meta_loss` with its gradient from one torch.compile'd graph (algorithm.compile=true).

        The meta-gradient g = ∇θ meta_loss is `torch.func.grad` of `meta_loss` run on the
        parameters θ as inputs, compiled whole (inner steps, their second-order terms and
        the outer backward in one graph, so the elementwise work is fused). Returned is the
        surrogate Σ θ·g, whose gradient is g: the outer step still makes exactly one
        backward call, which DDP all-reduces. The real loss goes in the metrics as "loss".
        The first step compiles (tens of seconds); a change of input shapes recompiles.
        """
        if self._meta_gradient is None:
            call = MetaLossCall(self)

            def loss_and_metrics(params: dict[str, Tensor], batch: Episode):
                loss, metrics = torch.func.functional_call(
                    call, {f"learner.{n}": p for n, p in params.items()}, (batch,)
                )
                return loss, (loss.detach(), metrics)

            self._meta_gradient = torch.compile(
                torch.func.grad(loss_and_metrics, has_aux=True),
                fullgraph=True,
                options=inductor_options(self.compile_mode),
            )
        if self.compile_mode == "reduce-overhead":
            # A new training iteration: the previous replay's outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        grads, (loss, metrics) = self._meta_gradient({name: p.detach() for name, p in params.items()}, batch)
        surrogate = sum((p * grads[name]).sum() for name, p in params.items())
        return surrogate, {**metrics, "loss": loss}

    def check_finite(self, loss: Tensor, inner_losses: Tensor | None) -> None:
        """Stop before a NaN/inf loss reaches the weights, so every checkpoint written stays good.

        One host sync per outer step; cheap next to the step itself.
        """
        for what, value in (("inner (support-set) loss", inner_losses), ("meta-loss", loss)):
            if value is None or bool(torch.isfinite(value).all()):
                continue
            worst = value[~torch.isfinite(value)].flatten()[0].item() if value.dim() else value.item()
            rates = [f"algorithm.optimizer.lr={self.optimizer_cfg.get('lr')}"]
            if hasattr(self, "inner_lr"):
                rates.insert(0, f"algorithm.inner_lr={self.inner_lr}")
            # The last good checkpoint is the checkpoint callback's to name (TrainingDiverged).
            finite = all(bool(torch.isfinite(p).all()) for p in self.parameters())
            state = (
                "The parameters were not updated with it"
                if finite
                else "The parameters were already non-finite after the previous update"
            )
            raise TrainingDiverged(
                f"training stopped at step {self.global_step}: the {what} is {worst}. Likely cause: a learning "
                f"rate too large for this task ({', '.join(rates)}); lower it, or clip the meta-gradient with "
                f"algorithm.grad_clip=<norm>. {state}"
            )

    def on_train_batch_start(self, batch: Episode, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: Episode, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        tasks = batch.support_x.shape[0]
        self.train_tasks += tasks
        if self._warm:
            self.train_time += seconds
            self.timed_tasks += tasks
        if self.logs_step(self.global_step):  # the optimizer has stepped: global_step counts this step
            self.log("train/tasks_per_sec", tasks / max(seconds, 1e-9))
        self._warm = True

    def parameter_groups(self) -> list[dict]:
        """What the outer optimizer updates; a learner may give some parameters their own lr."""
        return [{"params": list(self.parameters())}]

    def configure_optimizers(self):
        optimizer = instantiate(self.optimizer_cfg, _partial_=True)(self.parameter_groups())
        if self.scheduler_cfg is None:
            return optimizer
        scheduler = instantiate(self.scheduler_cfg, _partial_=True)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate_and_store(batch, self._episode_indices("val", batch_idx))

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate_and_store(batch, self._episode_indices("test", batch_idx))

    def on_validation_epoch_end(self) -> None:
        self._log_eval_summary("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_summary("test")

    def _episode_indices(self, stage: str, batch_idx: int) -> Tensor | None:
        """The fixed-episode indices of this evaluation batch, as the data module dealt it out."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "eval_batches"):
            return torch.tensor(datamodule.eval_batches(stage)[batch_idx])
        return None

    def stage_values(self) -> dict[str, Tensor]:
        """{metric: this process's per-episode values} of the evaluation running now (validation or
        test), for a learner that reports more from them (MANN's accuracy by instance)."""
        return {name: torch.cat(chunks) for name, chunks in self._eval_values.items()}

    def _evaluate_and_store(self, batch: Episode, indices: Tensor | None = None) -> None:
        with evaluation_mode():
            # A batch made under inference mode must be cloned out of it for autograd.
            if any(t.is_inference() for t in batch):
                batch = Episode(*(t.clone() for t in batch))
            values = self.evaluate(batch)
        for name, per_episode in values.items():
            self._eval_values[name].append(per_episode.detach().float())  # stays on device: no sync per batch
        if indices is None:  # loaders given without metalab's data module: episodes numbered as they come
            start = sum(len(i) for i in self._eval_indices)
            indices = torch.arange(start, start + batch.support_x.shape[0])
        self._eval_indices.append(indices)

    def _log_eval_summary(self, stage: str) -> None:
        indices, values = self._gather_eval_values()
        for name, per_episode in values.items():
            mean, ci95 = mean_and_ci95(per_episode)
            # Every DDP process holds the same gathered figures: the "sync" averages equal values.
            self.log(f"{stage}/{name}", mean, prog_bar=name == self.metric, sync_dist=True)
            self.log(f"{stage}/{name}_ci95", ci95, sync_dist=True)
        # How many fixed episodes the figures are over (each exactly once, whatever the process count).
        self.eval_episodes[stage] = len(indices)
        self.eval_per_episode[stage] = {
            "episode": indices.tolist(),
            "values": {name: v.tolist() for name, v in values.items()},
        }
        self._eval_values.clear()
        self._eval_indices.clear()

    def _gather_eval_values(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The evaluated episodes' indices and {metric: per-episode values}, in episode order,
        over every process's share of the fixed episodes.

        Under DDP each process evaluated a disjoint share of the episodes (datamodule.eval_batches);
        shares differ in size, and a process may have none, so they travel as Python objects.
        Every process gets the same values and so logs the same mean and CI.
        """
        local = {name: torch.cat(chunks).cpu() for name, chunks in self._eval_values.items()}
        local[_EPISODE] = (
            torch.cat(self._eval_indices).long() if self._eval_indices else torch.zeros(0, dtype=torch.long)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, local)
            names = sorted({name for share in shares for name in share})
            local = {name: torch.cat([share[name] for share in shares if name in share]) for name in names}
        indices = local.pop(_EPISODE)
        order = torch.argsort(indices, stable=True)
        return indices[order], {name: values[order] for name, values in local.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MARKER] = __version__

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resume restores the optimizer's and the scheduler's states, and with them the
        # settings they were built with (each group's lr, betas, weight decay; a scheduler's
        # T_max, step_size, gamma). This run's settings act instead: the stored states are
        # rewritten to what this run's configure_optimizers builds, before Lightning restores
        # them. A learning rate is changed by its ratio to the stored one, so a schedule goes on
        # from where it was, scaled (resuming with a lower rate after a divergence).
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or not checkpoint.get("optimizer_states"):
            return
        built = self.configure_optimizers()
        optimizer = built["optimizer"] if isinstance(built, dict) else built
        scheduler = built["lr_scheduler"]["scheduler"] if isinstance(built, dict) else None
        stored = checkpoint["optimizer_states"][0]["param_groups"]
        groups = optimizer.state_dict()["param_groups"]
        if len(stored) != len(groups):
            return  # another grouping of the parameters: Lightning's restore refuses it by itself
        changed, ratios = set(), []
        for old, new in zip(stored, groups):
            base = "initial_lr" if "initial_lr" in new and "initial_lr" in old else "lr"
            ratio = new[base] / old[base] if old[base] else 1.0
            ratios.append(ratio)
            for key, value in new.items():
                if key in ("params", "lr", "initial_lr") or old.get(key) == value:
                    continue
                changed.add(key)
                old[key] = value
            if ratio != 1.0:
                changed.add("lr")
                old["lr"] *= ratio
                old[base] = new[base]
        stored_schedules = checkpoint.get("lr_schedulers") or []
        if scheduler is not None and stored_schedules:
            state, fresh = stored_schedules[0], scheduler.state_dict()
            state["base_lrs"] = fresh.get("base_lrs", state.get("base_lrs"))
            if "_last_lr" in state:
                state["_last_lr"] = [lr * ratio for lr, ratio in zip(state["_last_lr"], ratios)]
            for key, value in fresh.items():
                if not key.startswith("_") and key not in ("last_epoch", "base_lrs") and state.get(key) != value:
                    changed.add(f"scheduler {key}")
                    state[key] = value
        if changed:
            log.info(f"resumed with this run's optimizer settings ({', '.join(sorted(changed))}), not the checkpoint's")

    # ------------------------------------------------------------------ helpers
    def task_loss_fn(self):
        """Cross-entropy for classification, mean squared error for regression."""
        if self.task_type == "classification":
            return torch.nn.functional.cross_entropy
        return torch.nn.functional.mse_loss

    def episode_metric(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Per-episode accuracy or MSE from [tasks, examples, ...] predictions."""
        if self.task_type == "classification":
            return (predictions.argmax(-1) == targets).float().mean(-1)
        return ((predictions - targets) ** 2).flatten(1).mean(-1)


class MetaLossCall(torch.nn.Module):
    """A learner's `meta_loss` as a module's forward, so torch.func.functional_call can run it
    on parameters given as inputs (the learner is its submodule `learner`)."""

    def __init__(self, learner: MetaLearner):
        super().__init__()
        self.learner = learner

    def forward(self, batch: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        return self.learner.meta_loss(batch)
