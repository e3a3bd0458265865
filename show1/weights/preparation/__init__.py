"""Preparing a weights folder before serving; `setup()` imports none of this.

script/download-weights (download) fetches the files the cascade reads from their sources (sources),
stores the checkpoints as safetensors in their serving dtypes (conversion) and writes the manifest;
script/verify-weights (verify) checks a folder against its manifest. Both also run inside the image,
so this package is not in .dockerignore.
"""
