import json
import subprocess
import sys

import orjson
import torch

from keisei_fn import ModelSpec, build_model, model_info, precision_policy


def test_model_info_is_json_and_complete():
    spec = ModelSpec(model_type="testmodel")
    info = model_info(spec, precision=precision_policy("cpu", mixed_precision="bf16"))
    assert json.loads(orjson.dumps(info)) == info
    assert info["spec"] == spec.to_json()
    assert info["obs_shape"] == [46, 9, 9]
    assert info["feature_set"]["num_planes"] == 46
    assert info["parameters"] == info["trainable_parameters"] == 2_216_516
    assert info["state_dict_keys"] == 39
    assert info["mixed_precision"]["dtype"] == "bfloat16"
    assert info["device"] == "cpu"


def test_model_info_with_live_model():
    spec = ModelSpec(model_type="testmodel")
    model = build_model(spec, seed=0, dtype=torch.bfloat16)
    model.stem.weight.requires_grad_(False)
    info = model_info(spec, model=model)
    assert info["trainable_parameters"] == info["parameters"] - model.stem.weight.numel()
    assert info["buffers"] == sum(b.numel() for b in model.buffers())


def test_import_is_light():
    code = (
        "import sys, keisei_fn;"
        "heavy = [m for m in ('wandb', 'cshogi', 'hypothesis') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
