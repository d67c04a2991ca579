"""Small settings for any registered method, so that tests over the whole registry run in
seconds: each option named here is shrunk wherever a method has it, so a new method needs no
entry of its own."""

import dataclasses

from dfkd.synthesis import method_class

SMALL = {"batch_size": 16, "steps": 4, "g_steps": 3, "nz": 16, "ngf": 8, "noise_dim": 16,
         "embed_dim": 8, "negatives": 16, "center_steps": 5, "bootstrap_size": 32, "warmup": 1,
         "g_life": 2, "g_iters": 6, "epoch": 4, "moves": 1, "directions": 2, "anchors": 2,
         "bisections": 3, "draws": 3}


def small_options(method: str) -> dict:
    fields = {f.name for f in dataclasses.fields(method_class(method).Options)}
    return {key: value for key, value in SMALL.items() if key in fields}
