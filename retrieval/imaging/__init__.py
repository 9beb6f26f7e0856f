"""Pixels in: decode files (raster, DICOM, NIfTI, DICOM series) and turn them into model input.

Torch-free, so decode worker processes stay light. :func:`retrieval.imaging.preprocess.to_model_input`
is the one function that fits a decoded image or volume to a space's preprocessing spec.
"""
