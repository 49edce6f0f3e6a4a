"""Using a trained model without training it: loading a run's EMA network
(:class:`Pipeline`), sampling with any sampler and guidance (``generate``), DDIM encoding,
decoding and interpolation (``control``), and the noise-aware classifier (``classifier``).

    from ipu_diffusion.inference import Pipeline
    pipe = Pipeline.from_workdir("runs/digits")
    images = pipe.sample(16, sampler="ddim", steps=50, seed=0)
"""
from ipu_diffusion.inference.pipeline import Pipeline, WorkdirError

__all__ = ["Pipeline", "WorkdirError"]
