"""Run in the compat environment (tests/compat_env.py: transformers 4.57, optimum-onnx, onnxruntime), without
hf_streamlm: load exports as a user of transformers 4.x would, and export them to ONNX with optimum.

    python -I tests/compat_check.py SPEC.json OUT.pt

SPEC.json: ``[{"name", "path", "family": "microbert"|"decoder", "texts": [...], "onnx": bool}, ...]``.
For each export: ``AutoTokenizer`` + ``AutoModelForMaskedLM``/``AutoModelForCausalLM`` (no
trust_remote_code), the batch ``tokenizer(texts, padding=True, truncation=True)`` and its logits; with
``onnx``, optimum's ``main_export`` (what ``optimum-cli export onnx`` runs) and the logits of the ONNX model
through ``ORTModelForMaskedLM``/``ORTModelForCausalLM`` (onnxruntime) on the same batch. OUT.pt holds, per
name, the batch, both logits and what the loader saw (classes, rotary settings, versions).
"""

import importlib.abc
import json
import sys


class _BlockHfStreamlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_streamlm" or name.startswith("hf_streamlm."):
            raise ModuleNotFoundError(f"{name} is blocked: exports must load without hf_streamlm")
        return None


sys.meta_path.insert(0, _BlockHfStreamlm())

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402


def check(entry: dict, workdir: str) -> dict:
    causal = entry["family"] == "decoder"
    tokenizer = AutoTokenizer.from_pretrained(entry["path"])
    model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(entry["path"]).eval()
    batch = tokenizer(entry["texts"], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    result = {
        "batch": dict(batch),
        "logits": logits,
        "tokenizer_class": type(tokenizer).__name__,
        "model_class": type(model).__name__,
        "model_max_length": tokenizer.model_max_length,
        "mask_token": (tokenizer.mask_token, tokenizer.mask_token_id),
        "rope_theta": getattr(model.config, "rope_theta", None),
        "rope_scaling": getattr(model.config, "rope_scaling", None),
        "inv_freq": model.model.rotary_emb.inv_freq.clone() if causal else None,
    }
    if entry.get("onnx"):
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForMaskedLM

        out = f"{workdir}/onnx-{entry['name']}"
        main_export(entry["path"], out, task="text-generation" if causal else "fill-mask", device="cpu")
        ort_class = ORTModelForCausalLM if causal else ORTModelForMaskedLM
        ort_model = ort_class.from_pretrained(out, **({"use_cache": False} if causal else {}))
        result["onnx_logits"] = torch.as_tensor(ort_model(**batch).logits)
        result["onnx_session_inputs"] = sorted(i.name for i in ort_model.model.get_inputs())
    return result


def main() -> None:
    spec_file, out_file = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_file).read())
    results = {entry["name"]: check(entry, str(__import__("pathlib").Path(out_file).parent)) for entry in spec}
    results["_versions"] = {"transformers": transformers.__version__, "torch": str(torch.__version__)}
    results["_hf_streamlm_imported"] = any(m.split(".")[0] == "hf_streamlm" for m in sys.modules)
    torch.save(results, out_file)


if __name__ == "__main__":
    main()
