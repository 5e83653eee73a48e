"""Write tests/data/hub-v1/: a model folder in format version 1, kept in the repository so that every later deeplab
is tested on reading a folder written by this one (tests/test_hub.py never writes it again).

    PYTHONPATH=src python tests/data/make_hub_v1.py [--force]

The model is the smallest that still has every part: a MobileNetV2 at depth multiplier 0.1 with 8-channel ASPP and
decoder, 4 input bands with their own mean and std, 3 classes with colours and class Values, explicit atrous rates
and align_corners=True; random weights and BatchNorm statistics from a fixed seed. Beside the folder: input.npy (a
fixed normalised input) and logits.npy (what this model computed for it when the folder was written).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from deeplab import ModelConfig, Preprocessing, build_model

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "hub-v1"


def make_model():
    torch.manual_seed(37)
    cfg = ModelConfig(backbone="mobilenet_v2", depth_multiplier=0.1, num_classes=3, in_channels=4, aspp_channels=8,
                      decoder_channels=8, low_level_channels=8, atrous_rates=(2, 4, 6), align_corners=True)
    model = build_model(cfg, class_names=["water", "field", "forest"],
                        preprocessing=Preprocessing(mean=(400.0, 500.0, 600.0, 2000.0), std=(90.0, 95.0, 100.0, 450.0)),
                        class_colors=[(0, 0, 255), (255, 255, 0), (0, 128, 0)], class_values=[1, 3, 7])
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so a lost buffer changes the logits
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def main() -> int:
    if FOLDER.exists():
        if "--force" not in sys.argv:
            print(f"{FOLDER} exists; it is the stored version-1 folder. Pass --force to write it again (only when the "
                  "format's version 1 itself was wrong)", file=sys.stderr)
            return 1
        shutil.rmtree(FOLDER)
    torch.set_num_threads(1)
    model = make_model()
    model.save_pretrained(FOLDER, license="apache-2.0")
    x = torch.randn(1, 4, 33, 33, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    np.save(HERE / "hub-v1-input.npy", x.numpy())
    np.save(HERE / "hub-v1-logits.npy", logits.numpy())
    size = sum(p.stat().st_size for p in FOLDER.iterdir())
    print(f"wrote {FOLDER} ({size / 1e3:.0f} kB) and its input and logits beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
