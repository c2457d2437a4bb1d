"""Score networks: lfmri's own U-Net and those of the public checkpoint families, with their conversions.

- `ddpm.DDPM`: score_sde's DDPM U-Net, lfmri's own score network (NCSN++ reuses its building blocks).
- `ncsnpp.NCSNpp`: score_sde's NCSN++ (the score-MRI VE prior), written here with score_sde's state-dict
  layout.
- `adm.ADMUNet`: guided-diffusion's ADM U-Net (the DDS prior) hosted in diffusers' `UNet2DModel`, with the key
  mapping from and to guided-diffusion state dicts.
- `families`: the checkpoint families, their conventions as data (`Family`), and `load_pretrained`.
- `pyconfig`: reading the Python config files that come with the public checkpoints.

The family modules are imported lazily by `diffusion.load_pretrained`; diffusers is only imported
when an ADM is built.
"""
