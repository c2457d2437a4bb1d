"""Score networks of the public checkpoint families and their conversions.

- `ncsnpp.NCSNpp`: score_sde's NCSN++ (the score-MRI VE prior), written here with score_sde's state-dict
  layout.
- `adm.ADMUNet`: guided-diffusion's ADM U-Net (the DDS prior) hosted in diffusers' `UNet2DModel`, with the key
  mapping from and to guided-diffusion state dicts.
- `families`: the checkpoint families, their conventions as data (`Family`), and `load_pretrained`.

score_sde's DDPM U-Net stays in `lightning_modules.ddpm`. Everything here is imported lazily by
`lightning_modules.load_pretrained`; diffusers is only imported when an ADM is built.
"""
