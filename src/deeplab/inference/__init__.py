"""Segmenting images the papers' way: multi-scale + flip, sliding windows, the dense CRF, metrics, evaluation and
prediction of files, plots. Runs a model through `deeplab.deploy.runtimes`."""
