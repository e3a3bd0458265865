"""The precision each network runs in.

On a GPU the pipeline runs in float16, as the reference did, with one exception that transformers
makes itself: a model loaded with dtype=float16 keeps the modules its class lists in
`_keep_in_fp32_modules` in float32 (T5's `wo` feed-forward outputs, whose activations overflow
float16). Measured against float32 (docs/fidelity.md, 'Half precision'), this is closer than
bfloat16 for both text encoders and for every UNet.
"""

import torch


def float32_module_names(model_class, dtype) -> frozenset:
    """Names of the submodules a `model_class` model loaded in `dtype` keeps in float32."""
    if dtype != torch.float16:
        return frozenset()
    return frozenset(getattr(model_class, "_keep_in_fp32_modules", None) or ())


def tensor_dtype_rule(model_class, dtype):
    """rule(name, stored_dtype): the dtype a checkpoint tensor `name` (a state-dict key) has in a
    `model_class` model loaded in `dtype`: the float32 modules its class declares stay float32,
    integer and boolean buffers keep their dtype. With dtype None every tensor keeps its stored
    dtype. The loader reads checkpoints with it, and script/download-weights stores them with it."""
    keep = float32_module_names(model_class, dtype)

    def rule(name, stored_dtype):
        if dtype is None or not stored_dtype.is_floating_point:
            return stored_dtype
        return torch.float32 if keep.intersection(name.split(".")) else dtype

    return rule


def cast_as_loaded(model, dtype):
    """Casts a model built in memory to the dtypes it would have if loaded in `dtype`."""
    model.to(dtype)
    keep = float32_module_names(type(model), dtype)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            module.float()
    return model
