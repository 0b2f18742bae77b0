"""Public data types, re-exported from the subsystems (torch-free at import)."""

from asyncrl.trainer.types import AdamParams, Datum, ModelInput, datum_from_model_input_weights

__all__ = ["AdamParams", "Datum", "ModelInput", "datum_from_model_input_weights"]
