"""Meta-learners by config name (`algorithm=<name>`)."""

from metalab.algorithms.base import MetaLearner
from metalab.algorithms.maml import MAML
from metalab.algorithms.protonet import ProtoNet

ALGORITHMS: dict[str, type[MetaLearner]] = {"maml": MAML, "protonet": ProtoNet}

__all__ = ["ALGORITHMS", "MetaLearner", "MAML", "ProtoNet"]
