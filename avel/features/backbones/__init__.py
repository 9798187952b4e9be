"""The built-in backbones; importing this package registers each in :mod:`avel.features.registry`."""
from . import efficientnet, logmel, vgg, vggish  # noqa: F401  (registration side effects)
