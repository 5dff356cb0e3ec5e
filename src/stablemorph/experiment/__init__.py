"""The stability experiment's machinery.

- :mod:`stablemorph.experiment.data`: offline data sets (Fashion-MNIST, MNIST, CIFAR-10,
  sklearn digits) as normalised in-memory tensors.
- :mod:`stablemorph.experiment.train`: a deterministic training loop whose batches are a
  pure function of ``(seed, step)``, with dense-then-sparse evaluation schedules.

Import from the submodules directly; this package file imports nothing so that loading one
part never pulls in the others.
"""
