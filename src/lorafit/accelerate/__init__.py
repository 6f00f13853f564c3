"""Accelerate config files shipped with lorafit (``accelerate launch --config_file ...``).

``ddp.yaml`` (data parallel, every GPU holds the whole model), ``fsdp.yaml`` (full sharding,
one FSDP unit per encoder layer), ``zero2.yaml`` and ``zero3.yaml`` (DeepSpeed, for
deberta-v2-xxlarge). See the README's "Scaling out" and docs/scaling.md.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import LorafitError

CONFIG_DIR = Path(__file__).parent


def config_path(name: str) -> Path:
    """The shipped config called ``name`` (``ddp``, ``fsdp``, ``zero2``, ``zero3``)."""
    path = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise LorafitError(f"no shipped Accelerate config {name!r} (shipped: {known})")
    return path
