"""Datasets: the in-memory uint8 :class:`~robustse.data.base.Dataset`, the registered sets
(Fashion-MNIST from its IDX files by default; MNIST, CIFAR-10, SVHN through torchvision) and
``imagefolder:DIR`` image folders decoded on demand. May import :mod:`robustse.core` and
:mod:`robustse.models` (an image folder's preparation)."""
