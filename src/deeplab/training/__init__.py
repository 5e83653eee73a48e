"""Training with the papers' protocol: `fit`, its configuration, losses, run folders, warm starts, PreciseBN and
distributed training. Validates through `deeplab.inference`."""
