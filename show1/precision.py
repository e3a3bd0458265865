"""The precision each network runs in.

On a GPU the pipeline runs in float16, as the reference did, with one exception that transformers
makes itself: a model loaded with dtype=float16 keeps the modules its class lists in
`_keep_in_fp32_modules` in float32 (T5's `wo` feed-forward outputs, whose activations overflow
float16). Measured against float32 (README, 'Fidelity'), this is closer than bfloat16 for both
text encoders and for every UNet.
"""

import torch


def float32_module_names(model_class, dtype) -> frozenset:
    """Names of the submodules a `model_class` model loaded in `dtype` keeps in float32."""
    if dtype != torch.float16:
        return frozenset()
    return frozenset(getattr(model_class, "_keep_in_fp32_modules", None) or ())


def tensor_dtype(name, model_class, dtype):
    """The dtype of the floating-point tensor `name` (a state-dict key) of a `model_class` model
    loaded in `dtype`."""
    keep = float32_module_names(model_class, dtype)
    return torch.float32 if keep.intersection(name.split(".")) else dtype


def cast_as_loaded(model, dtype):
    """Casts a model built in memory to the dtypes it would have if loaded in `dtype`."""
    model.to(dtype)
    keep = float32_module_names(type(model), dtype)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            module.float()
    return model
