"""Meta-learners by config name (`algorithm=<name>`).

Each learner lives in its own module, imported only when it is asked for, so a run
pays for (and can only break on) the learner it uses.
"""

from collections.abc import Iterator, Mapping
from importlib import import_module

from metalab.algorithms.base import MetaLearner
from metalab.errors import metalab_class

# config name -> "module:Class" under metalab.algorithms
_LEARNERS = {
    # optimization-based
    "maml": "maml:MAML",
    "fomaml": "fomaml:FOMAML",
    "reptile": "reptile:Reptile",
    "anil": "anil:ANIL",
    "metasgd": "metasgd:MetaSGD",
    "mamlpp": "mamlpp:MAMLPlusPlus",
    # metric-based
    "protonet": "protonet:ProtoNet",
    "matchingnet": "matchingnet:MatchingNet",
    "relationnet": "relationnet:RelationNet",
    # transfer baselines: trained without episodes, fine-tuned at meta-test
    "baseline": "baseline:Baseline",
    "baselinepp": "baseline:BaselinePlusPlus",
    "pretrained": "pretrained:PretrainedBaseline",
    # memory-based, and its memoryless baseline
    "mann": "mann:MANN",
    "lstm": "mann:LSTMBaseline",
}


class _Registry(Mapping):
    def __getitem__(self, name: str) -> type[MetaLearner]:
        module, cls = _LEARNERS[name].split(":")
        return getattr(import_module(f"metalab.algorithms.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_LEARNERS)

    def __len__(self) -> int:
        return len(_LEARNERS)


ALGORITHMS: Mapping[str, type[MetaLearner]] = _Registry()


def learner_class(algorithm: Mapping) -> type[MetaLearner]:
    """The learner an `algorithm` config builds: the class its `_target_` names (each
    conf/algorithm/<name>.yaml names its own, so a new learner is a class and a yaml file)."""
    return metalab_class(
        "algorithm._target_",
        algorithm.get("_target_"),
        "metalab.algorithms",
        MetaLearner,
        f"choose a learner with algorithm=<name> ({', '.join(_LEARNERS)})",
    )


__all__ = ["ALGORITHMS", "MetaLearner", "learner_class"]
