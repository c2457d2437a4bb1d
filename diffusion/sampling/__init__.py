"""Plain-torch sampling code (no Lightning): what turns a score network into reconstructions.

- `sde`: the SDEs (`VPSDE`, `DiscreteVPSDE`, `VESDE`), `get_score_fn` and `pad_to_multiple`.
- `data_consistency`: the data-consistency steps (`GradientDC`, `ProximalDC`).
- `samplers`: the reverse-diffusion samplers, their registry `SAMPLERS` / `DEFAULT_SAMPLER` and
  `build_sampler`.
- `options`: `SamplerOptions`, a sampler as a user chooses it (a registry name and its options), the one type
  of every command and the validation callback (torch-free).

Import the modules directly (`from diffusion.sampling.samplers import build_sampler`).
"""
