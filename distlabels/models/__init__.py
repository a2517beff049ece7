"""Emulators behind one interface: ``load(path)`` returns a torch module for any registered kind."""
from .base import Emulator, ProjectedEmulator, load, read_model_dir, register_kind, registered_kinds, sha256_file
from .cannon import CannonModel
from .payne import PayneMLP
from .payne_perpixel import PerPixelPayne
from .transformer_payne import TransformerPayne

__all__ = ["CannonModel", "Emulator", "PayneMLP", "PerPixelPayne", "ProjectedEmulator", "TransformerPayne", "load",
           "read_model_dir", "register_kind", "registered_kinds", "sha256_file"]
