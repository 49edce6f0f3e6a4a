"""ipu_diffusion: DDPM / improved DDPM / DDIM training with pipelined U-Nets, on
Graphcore IPUs through the Poplar TensorFlow port or on plain TensorFlow devices."""
__version__ = "0.1.0"
