"""Time one DoRA training step, peftlab against peft, on the same Llama-architecture model.

Model: LlamaForCausalLM with hidden 256, 4 layers, 4 heads, intermediate 1024 (4 × hidden, as the lab LM),
the lab vocabulary size (51) unless --vocab is given; batch 8 × seq 128; DoRA r=16 (α=16) on q, k, v, o;
AdamW. Steps alternate peftlab, peft, floor, peftlab, peft, floor, … (so all see the same machine load) and
the ratio is taken per pair; the report is the median ratio and the median step times. The floor is the
same model with no adapter, only the embedding trained: the forward and the full backward through the
frozen layers that any adapter pays for, the time no adapter implementation can go below.

    .venv/bin/python tools/bench_dora.py [--steps 30] [--vocab 51] [--device cpu] [--lora]

Explained in: book/lora_in_practice.ipynb
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402


def build(lib, vocab: int, device: str, dora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(device)
    config = lib.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            use_dora=dora)
    pm = lib.get_peft_model(model, config).train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    return pm, opt


def build_floor(vocab: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(device).train()
    for n, p in model.named_parameters():
        p.requires_grad_(n == "model.embed_tokens.weight")
    return model, torch.optim.AdamW([model.model.embed_tokens.weight], lr=1e-4)


def step(pm, opt, x, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=51)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora", action="store_true", help="time plain LoRA instead of DoRA")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    warnings.filterwarnings("ignore")
    import peft

    import peftlab

    x = torch.randint(0, args.vocab, (8, 128), generator=torch.Generator().manual_seed(0)).to(args.device)
    ours = build(peftlab, args.vocab, args.device, not args.lora)
    ref = build(peft, args.vocab, args.device, not args.lora)
    floor = build_floor(args.vocab, args.device)
    times: dict[str, list[float]] = {"peftlab": [], "peft": [], "floor": []}
    for i in range(args.warmup + args.steps):
        t_ours = step(*ours, x, args.device)
        t_ref = step(*ref, x, args.device)
        t_floor = step(*floor, x, args.device)
        if i >= args.warmup:
            times["peftlab"].append(t_ours)
            times["peft"].append(t_ref)
            times["floor"].append(t_floor)
    ratios = [a / b for a, b in zip(times["peftlab"], times["peft"])]
    floors = [a / b for a, b in zip(times["floor"], times["peft"])]
    kind = "LoRA" if args.lora else "DoRA"
    print(f"{kind} step on {args.device}, {args.steps} interleaved triples: "
          f"peftlab {statistics.median(times['peftlab']) * 1e3:.1f} ms, "
          f"peft {statistics.median(times['peft']) * 1e3:.1f} ms, "
          f"no-adapter floor {statistics.median(times['floor']) * 1e3:.1f} ms; "
          f"median ratio peftlab/peft {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}–{statistics.quantiles(ratios, n=4)[2]:.3f}), "
          f"floor/peft {statistics.median(floors):.3f}")


if __name__ == "__main__":
    main()
