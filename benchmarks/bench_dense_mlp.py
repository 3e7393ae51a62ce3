"""Two-layer MLPs and LayerNorm models (BERT, GPT-2): what one layer keeps for backward, PEFT vs patched.

--cpu (exact, any machine, ~1 min): bert-base and GPT-2 small widths (hidden 768, intermediate 3072, 12 heads),
      PEFT LoRA r=16 on all linear layers, dropout 0.05, the models' own dropout off, fp32, 2 x 128 tokens. One
      interior layer's bytes saved for backward (parameters excluded) are the difference between a 3-layer and a
      2-layer model, in hidden vectors per token: PEFT; patched with ``fuse_mlp=False, recompute="none"`` (LoRA,
      attention); ``recompute="none"`` (+ the two-layer MLP's one-op activation); ``recompute="norms"`` (+ the
      activation output and the norm outputs rebuilt in backward); the default, ``recompute="up"`` (+ no
      pre-activation: backward runs the up projection again; "attn" and "mlp" keep the same in these models, which
      have no RoPE attention or gated MLP). Writes ``results/cpu-dense-mlp.json``.
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # label -> patch kwargs (None: PEFT unpatched)
    "peft": None,
    "lora+attention": {"fuse_mlp": False, "recompute": "none"},
    "+ mlp activation": {"recompute": "none"},
    "+ rebuilds (recompute=norms)": {"recompute": "norms"},
    "+ up rerun (default, recompute=up)": {},
}


def _model(arch: str, layers: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if arch == "bert-base":
        base = BertForMaskedLM(BertConfig(num_hidden_layers=layers, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0, vocab_size=1024))
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    else:
        base = GPT2LMHeadModel(GPT2Config(n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          vocab_size=1024, bos_token_id=0, eos_token_id=1))
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["c_attn", "c_proj", "c_fc"],
                         fan_in_fan_out=True)
    model = get_peft_model(base, cfg)
    model.train()
    return model


def saved_bytes(arch: str, layers: int, patch_kwargs: dict | None, tokens: tuple[int, int] = (2, 128)) -> int:
    import torch

    import peftfast
    from peftfast.bench import saved_activation_bytes

    model = _model(arch, layers)
    if patch_kwargs is not None:
        peftfast.patch(model, **patch_kwargs)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1024, tokens, generator=g)
    labels = ids.clone()
    if arch == "bert-base":
        labels[:, ::3] = -100
    torch.manual_seed(0)
    _, saved = saved_activation_bytes(lambda: model(input_ids=ids, labels=labels).loss,
                                      [*model.parameters(), *model.buffers()])
    return saved.total


def run_cpu(out_path: str) -> list[dict]:
    import torch

    from peftfast.bench import _versions, git_commit

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    tokens, hidden = 2 * 128, 768
    for arch in ("bert-base", "gpt2"):
        for label, kw in VARIANTS.items():
            layer = saved_bytes(arch, 3, kw) - saved_bytes(arch, 2, kw)
            rows.append({"model": arch, "variant": label, "patch": kw, "saved_bytes_per_layer": layer,
                         "saved_hvec_per_token_layer": layer / (tokens * hidden * 4)})
    print(f"{'model':<10}{'variant':<36}{'hidden vectors / token / layer':>32}{'vs peft':>9}")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "peft")
        r["ratio_vs_peft"] = r["saved_bytes_per_layer"] / base["saved_bytes_per_layer"]
        print(f"{r['model']:<10}{r['variant']:<36}{r['saved_hvec_per_token_layer']:>32.2f}{r['ratio_vs_peft']:>8.3f}x")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    commit = git_commit()  # before opening: a truncated tracked file would read as "+dirty"
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "versions": _versions(), "commit": commit,
                   "shape": "hidden 768, intermediate 3072, 12 heads, 2 x 128 tokens, fp32, LoRA r=16 all linear, "
                            "dropout 0.05; one interior layer (3-layer minus 2-layer model)"}, f, indent=2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="exact saved-activation counts (any machine)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu-dense-mlp.json"))
    args = ap.parse_args()
    if not args.cpu:
        ap.error("choose --cpu (these are exact counts; GPU timings of the same models come from `peftfast bench "
                 "--model bert-base`)")
    run_cpu(args.out)


if __name__ == "__main__":
    main()
