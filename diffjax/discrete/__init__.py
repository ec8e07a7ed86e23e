"""Discrete-state diffusion: processes, the categorical denoiser, losses, samplers and the ELBO."""
