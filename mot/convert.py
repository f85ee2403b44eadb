"""Branch a trained dense model into MoT: copy each dense weight into every modality's copy.

    mot_model.load_state_dict(dense_to_mot_state(dense_model.state_dict(), mot_model))

Parameter names are the same in both models; a modality-untied parameter has one more leading
dimension (G). Dense linear weights are (D_out, D_in) and grouped ones (G, D_in, D_out), so they
are transposed on the way; the grouped FFN's `w13` takes the dense `w1` and `w3` side by side.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def dense_to_mot_state(dense_state: dict[str, torch.Tensor],
                       mot_model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    dense_state = dict(dense_state)
    for name, target in mot_model.state_dict().items():
        stem = name[:-len("w13")]
        if name.endswith("w13") and name not in dense_state and f"{stem}w1.weight" in dense_state:
            dense_state[name] = torch.cat([dense_state[f"{stem}w1.weight"],
                                           dense_state[f"{stem}w3.weight"]])  # (2H, D)
        source_name = name if name in dense_state else f"{name}.weight"
        if source_name not in dense_state:
            raise ValueError(f"dense checkpoint has no {name!r} (nor {name}.weight)")
        source = dense_state[source_name]
        if source.shape == target.shape:
            out[name] = source.clone()
            continue
        if source.dim() == 2:  # nn.Linear (D_out, D_in) -> grouped (D_in, D_out)
            source = source.t()
        if target.dim() != source.dim() + 1 or target.shape[1:] != source.shape:
            raise ValueError(f"{name}: dense shape {tuple(dense_state[source_name].shape)} "
                             f"does not map onto {tuple(target.shape)}")
        out[name] = source.unsqueeze(0).expand_as(target).clone()
    return out
