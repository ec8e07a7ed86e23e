"""Reference implementations driven on our problems (needs the `peers` extra: CPU torch, diffusers).

`diffusers_schedulers` runs diffusers' schedulers on an exact denoiser supplied by the caller;
`make_fixtures` writes the small npz fixtures that `tests/test_faithfulness.py` reads (no torch there).
"""
