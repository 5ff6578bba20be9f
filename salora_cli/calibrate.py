"""`salora calibrate`: the safety basis V_s of every target module."""

import argparse


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present, else the CPU)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="the base model's precision (default: bfloat16 on CUDA, float32 on the CPU); adapters stay float32")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from salora.presets import DEFAULTS

    d = DEFAULTS["calibrate"]
    p = sub.add_parser("calibrate", help="compute the safety basis from harmful prompts and the model's refusals")
    p.add_argument("--model", required=True, help="model directory or `embedded`")
    p.add_argument("--data", required=True, help="chat `messages` records (user prompt + refusal): JSONL, a parquet file, or a local HF datasets directory (save_to_disk)")
    p.add_argument("--out", required=True, help="new directory for safety.safetensors and safety.json")
    p.add_argument("--target-modules", type=csv_list, default=None,
                   help="comma-separated (default: all seven linear projections, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; "
                        "the paper's: q_proj,v_proj)")
    p.add_argument("--rank-safety", type=int, default=None, help=f"r_s, safety directions per module (default {d['rank_safety']})")
    p.add_argument("--energy", type=float, default=None, help="pick r_s per module as the fewest directions capturing this share of the spectrum (instead of --rank-safety)")
    p.add_argument("--input-energy", type=float, default=None,
                   help=f"also compute the input-side guard U capturing this share of the safety conversations' input energy "
                        f"(default {d['input_energy']}; this project's guard, which `train --projection input` needs; --preset paper turns it off)")
    p.add_argument("--contrast-data", default=None, help="benign conversations (JSONL, parquet or a datasets directory): make the basis contrastive (refusal minus benign directions)")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: q_proj,v_proj, r_s 32, top-variance basis, no input guard, 128 samples; a flag that contradicts it is an error")
    p.add_argument("--max-samples", type=int, default=None, help=f"conversations used (default {d['max_samples']})")
    p.add_argument("--generate-responses", action="store_true", help="answer the prompts with the base model; keep its refusals")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length with --generate-responses")
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation")
    p.add_argument("--batch-size", type=int, default=8)
    add_device_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.calibrate import calibrate
    from salora.presets import resolve

    keys = ("target_modules", "rank_safety", "energy", "contrast_data", "max_samples", "input_energy")
    method = resolve("calibrate", args.preset, {k: getattr(args, k) for k in keys})
    meta = calibrate(
        args.model, args.data, args.out, method["target_modules"], method["rank_safety"], method["max_samples"],
        args.generate_responses, args.max_new_tokens, args.batch_size, energy=method["energy"], contrast_data=method["contrast_data"],
        input_energy=method["input_energy"], device=args.device, dtype=args.dtype, max_length=args.max_length,
    )
    ranks = sorted(set(meta["ranks"].values()))
    phases = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in meta["seconds"].items())
    print(f"{meta['basis']} safety basis, r_s {ranks[0]}..{ranks[-1]}, for {len(meta['modules'])} modules from {meta['response_tokens']} response tokens "
          f"({phases}) -> {args.out}")
