"""Model zoo: importing this package registers every architecture by name."""

from . import digits, generators, lenet, resnet_cifar, vgg, wrn  # noqa: F401  (registration)
from .registry import (
    create_model,
    default_student,
    is_registered,
    list_models,
    model_input_shape,
    register_model,
)

__all__ = ["create_model", "default_student", "is_registered", "list_models",
           "model_input_shape", "register_model"]
