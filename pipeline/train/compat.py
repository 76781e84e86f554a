"""Work-arounds for the installed DeepSpeed, each narrow and documented.

DeepSpeed 0.19.8 broadcasts parameters as ``p.data.view(torch.uint8)`` when the engine
starts (stages 0-2: ``DeepSpeedEngine._broadcast_model``; stage 3: ``zero.Init._zero_init_param``).
torch cannot view a 0-dim tensor with another element size, so a 0-dim parameter (ALBEF's
temperature ``temp``, CLIP's ``logit_scale``) stops the start with "self.dim() cannot be 0 to
view Float as Byte". The patches broadcast 0-dim parameters through a 1-element view; shapes
and everything else stay as DeepSpeed has them. They are applied only while torch still
refuses the view (``torch.zeros(()).view(torch.uint8)``).
"""
from __future__ import annotations

import torch


def _scalar_view_fails() -> bool:
    try:
        torch.zeros(()).view(torch.uint8)
        return False
    except RuntimeError:
        return True


def patch_scalar_broadcast() -> None:
    if not _scalar_view_fails():
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    if not getattr(original, "_elip_scalar_patch", False):

        def _broadcast_model(self):
            scalars = [p for p in self.module.parameters() if p.dim() == 0]
            for p in scalars:
                p.data = p.data.view(1)
            try:
                original(self)
            finally:
                for p in scalars:
                    p.data = p.data.view(())

        _broadcast_model._elip_scalar_patch = True
        DeepSpeedEngine._broadcast_model = _broadcast_model

    from deepspeed.runtime.zero import partition_parameters as pp

    init_param = pp.Init._zero_init_param
    if not getattr(init_param, "_elip_scalar_patch", False):

        def _zero_init_param(self, param):
            if param.dim() > 0:
                return init_param(self, param)
            # DeepSpeed's body, with the broadcast through a 1-element view
            self._convert_to_deepspeed_param(param)
            group = self.get_partition_dp_group(param)
            src = 0 if pp.dist.get_world_group() == group else pp.dist.get_global_rank(group, 0)
            pp.dist.broadcast(param.data.view(1).view(torch.uint8), src, group)
            param.partition()

        _zero_init_param._elip_scalar_patch = True
        pp.Init._zero_init_param = _zero_init_param
