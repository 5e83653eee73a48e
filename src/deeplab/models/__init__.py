"""The model: configuration, layers, backbones, heads (ASPP, decoder), PointRend, `build_model`, checkpoints and
parameter / multiply-add counts. The bottom layer: it imports nothing else of deeplab."""
