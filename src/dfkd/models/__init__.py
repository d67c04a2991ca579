"""Model zoo: importing this package registers every architecture by name."""

# importing each module registers its architectures
from . import digits, generators, lenet, mlp, resnet_a, resnet_cifar, vgg, wrn  # noqa: F401
from .registry import (
    create_model,
    default_student,
    is_registered,
    list_families,
    list_models,
    model_factory,
    model_input_shape,
    register_family,
    register_model,
)

__all__ = ["create_model", "default_student", "is_registered", "list_families", "list_models",
           "model_factory", "model_input_shape", "register_family", "register_model"]
