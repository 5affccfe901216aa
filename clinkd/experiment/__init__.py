"""Experiments on the demo's data and models: ``clinkd experiment ablation`` (``ablation.run_ablation``)
trains each row of the paper's ablation table over several seeds and reports what each part of the
method changes (``summary``)."""
