"""Project-wide helpers at the bottom of the package order (the standard library, and numpy for
`volumes`; nothing from `degradations`, `datamodules`, `lightning_modules` or `lfmri`).

- `errors.InputError`: bad user input, printed by the CLI as one line with exit code 2.
- `files`: atomic writes of files and folders (`atomic_path`, `atomic_dir`, `remove_stale`) and the input /
  output path checks (`check_input_file`, `check_output_file`, `check_output_dir`).
- `options`: range checks of constructor options (`Rule`, `number`, `sequence`, `ordered_range`,
  `check_options`).
- `seeding.stable_hash`: seeds identical on every machine and run.
- `volumes.check_volume`: the one rule for what an input volume or measurement may be (3D, finite, slices of
  at least `MIN_SLICE_SIZE` x `MIN_SLICE_SIZE`, not all zero, a magnitude not negative).

Import the modules directly (`from lfmri_utils.errors import InputError`); this package imports nothing.
"""
