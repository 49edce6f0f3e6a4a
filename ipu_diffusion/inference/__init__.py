"""Using a trained model without training it: loading a run's EMA network
(:class:`Pipeline`), sampling with any sampler and guidance (``generate``), DDIM encoding,
decoding and interpolation (``control``), the noise-aware classifier (``classifier``),
and importing diffusers' DDPM weights (``diffusers_import``).

    from ipu_diffusion.inference import Pipeline
    pipe = Pipeline.from_workdir("runs/digits")
    images = pipe.sample(16, sampler="ddim", steps=50, seed=0)

``Pipeline`` and ``WorkdirError`` load on first use, so importing this package (as the
CLI does for its early checks) does not start TensorFlow.
"""
__all__ = ["Pipeline", "WorkdirError"]


def __getattr__(name):
    if name in __all__:
        from ipu_diffusion.inference import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ipu_diffusion.inference' has no attribute {name!r}")
