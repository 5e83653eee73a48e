"""The first convolution of a model of N input bands, made from the weights of an RGB (3-band) one.

Starting a multispectral model from RGB weights (`--init-checkpoint`, `--backbone-weights`) needs a first kernel of
N input channels. The rule used here, written down once:

* a band that is red, green or blue takes that colour's filter;
* every other band takes the mean of the three colour filters;
* the whole kernel is then scaled by 3 / N.

The scaling keeps the response to a grey input (every band the same normalised value v) exactly what the RGB model
gives for a grey image: sum over bands = 3/N * (3 + (N - 3)) * mean * v = 3 * mean * v, the RGB kernel's sum. That is
timm's `adapt_input_conv` scaling. arcgis.learn (`_get_ms_tail`) copies the colour filters unscaled and leaves the
other bands at random initialisation by default (or copies the red filter, `type_init_tail_parameters='red_band'`);
it does not scale. deeplab follows neither exactly: the mean filter gives the extra bands a start that responds to
intensity the way the pretrained colours do, and the 3 / N keeps the next BatchNorm's statistics where they were
trained. A single-band model gets the three filters summed (a grey image, as the RGB model sees it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["adapt_input_conv", "input_conv_name"]


def input_conv_name(module: nn.Module) -> str:
    """The state-dict key of the weight of `module`'s first convolution (the one that reads the image)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.weight" if name else "weight"
    raise ValueError(f"{type(module).__name__} has no convolution")


def adapt_input_conv(weight: torch.Tensor, *, bands: int, rgb: Sequence[int] | None = (0, 1, 2)) -> torch.Tensor:
    """An (O, bands, kh, kw) kernel from an RGB kernel `weight` (O, 3, kh, kw) by the rule in the module docstring.

    `rgb`: the positions of the red, green and blue bands among the `bands` (None: no band is a colour; every band
    takes the mean filter). Returns `weight` itself for 3 bands in RGB order.
    """
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB kernel (O, 3, kh, kw), got shape {tuple(weight.shape)}")
    if bands < 1:
        raise ValueError(f"--bands {bands}: a model reads at least 1 band")
    if rgb is not None:
        rgb = tuple(int(b) for b in rgb)
        if len(rgb) != 3 or len(set(rgb)) != 3 or min(rgb) < 0 or max(rgb) >= bands:
            raise ValueError(f"--rgb-bands {','.join(map(str, rgb))}: give the 0-based positions of the red, green and "
                             f"blue bands, three different numbers below --bands {bands}")
        if bands == 3 and rgb == (0, 1, 2):
            return weight
    mean = weight.mean(dim=1, keepdim=True)  # (O, 1, kh, kw)
    out = mean.repeat(1, bands, 1, 1)
    for colour, band in enumerate(rgb or ()):
        out[:, band] = weight[:, colour]
    return out * (3.0 / bands)
