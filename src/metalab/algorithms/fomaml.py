"""First-order MAML (Finn et al. 2017, Section 5.2; Nichol et al. 2018).

MAML with the inner gradient treated as a constant in the outer backward pass:

    θ'_i = θ − α ∇θ L(θ; S_i)           (∇θ L detached)
    θ   ← θ − β Σ_i ∇θ' L(θ'_i; Q_i)     (the query gradient at the adapted weights)

No second derivatives, so memory does not hold the inner steps' backward graphs.
"""

from metalab.algorithms.maml import MAML


class FOMAML(MAML):
    fixed_settings = {
        "first_order": (True, "fomaml is first order by definition; for second-order MAML use algorithm=maml")
    }

    def __init__(self, *, first_order: bool = True, **settings):
        """MAML's settings (conf/algorithm/fomaml.yaml), first order."""
        super().__init__(first_order=first_order, **settings)

    def training_first_order(self) -> bool:
        return True
