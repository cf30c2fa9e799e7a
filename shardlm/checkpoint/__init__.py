"""Asynchronous, atomic, layout-free checkpoints: orbax-checkpoint on tensorstore (zarr3 + OCDBT).

format: the files and how they read back; manager: a run's saves and restores; cli: `python -m
shardlm.checkpoint inspect DIR` and `... export-params DIR OUT`.
"""
from shardlm.checkpoint.cli import export_params, inspect, main
from shardlm.checkpoint.format import (FORMAT, Target, Unreadable, committed_steps, find, flat_names,
                                       read_arrays, read_meta, read_params_numpy, save_params)
from shardlm.checkpoint.manager import Checkpoints, restore_params

__all__ = ['FORMAT', 'Checkpoints', 'Target', 'Unreadable', 'committed_steps', 'export_params',
           'find', 'flat_names', 'inspect', 'main', 'read_arrays', 'read_meta', 'read_params_numpy',
           'restore_params', 'save_params']
