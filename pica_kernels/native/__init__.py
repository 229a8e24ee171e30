"""The native front end over :mod:`pica_kernels.core`: config, apply, layer (PiCaLinear), model-level calls,
adapter files, LoRA export, parameter report, spectral analysis. The public names are re-exported by
:mod:`pica_kernels`."""
