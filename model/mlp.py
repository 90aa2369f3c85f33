"""timm's ``Mlp`` whose inference under bf16 autocast on a CPU runs its two products fused with their bias and
activation (``model.kernels.linear``); the same parameters, state dict keys and function."""
from timm.layers import Mlp as TimmMlp
from torch import nn

from model.kernels import fuses_linear_epilogue, linear


class Mlp(TimmMlp):
    """``fc1 -> GELU -> dropout -> norm -> fc2 -> dropout`` (timm ``Mlp``, plain linear layers).

    At inference under bf16 autocast on a CPU the exact (erf) GELU is applied inside fc1's product and fc2's
    bias inside its own; with any other activation, a norm layer or active dropout it runs as timm's.
    """

    def forward(self, x):
        if not (fuses_linear_epilogue(x) and self._fusable()):
            return super().forward(x)
        return linear(linear(x, self.fc1.weight, self.fc1.bias, "gelu"), self.fc2.weight, self.fc2.bias)

    def _fusable(self):
        return (isinstance(self.act, nn.GELU) and self.act.approximate == "none" and isinstance(self.norm, nn.Identity)
                and isinstance(self.fc1, nn.Linear) and isinstance(self.fc2, nn.Linear)
                and not (self.training and (self.drop1.p or self.drop2.p)))
