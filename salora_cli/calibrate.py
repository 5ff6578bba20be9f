"""`salora calibrate`: the safety basis V_s of every target module."""

import argparse


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="compute the safety basis from harmful prompts and the model's refusals")
    p.add_argument("--model", required=True, help="model directory or `embedded`")
    p.add_argument("--data", required=True, help="JSONL of chat `messages` (user prompt + refusal)")
    p.add_argument("--out", required=True, help="new directory for safety.safetensors and safety.json")
    p.add_argument("--target-modules", type=csv_list, default=None,
                   help="comma-separated (default: all seven linear projections, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; "
                        "the paper's: q_proj,v_proj)")
    p.add_argument("--rank-safety", type=int, default=32, help="r_s, safety directions per module (default 32)")
    p.add_argument("--energy", type=float, default=None, help="pick r_s per module as the fewest directions capturing this share of the spectrum (instead of --rank-safety)")
    p.add_argument("--input-energy", type=float, default=0.9,
                   help="also compute the input-side guard U capturing this share of the safety conversations' input energy "
                        "(default 0.9; this project's guard, which `train --projection input` needs; --preset paper turns it off)")
    p.add_argument("--contrast-data", default=None, help="benign JSONL: make the basis contrastive (refusal minus benign directions)")
    p.add_argument("--preset", choices=["paper"], default=None, help="paper: q_proj,v_proj, r_s 32, top-variance basis, no input guard, 128 samples")
    p.add_argument("--max-samples", type=int, default=128, help="conversations used (default 128)")
    p.add_argument("--generate-responses", action="store_true", help="answer the prompts with the base model; keep its refusals")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length with --generate-responses")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.calibrate import calibrate
    from salora.tuner.config import ALL_LINEAR, PAPER_TARGETS

    if args.preset == "paper":
        args.target_modules, args.rank_safety, args.energy, args.contrast_data, args.max_samples = list(PAPER_TARGETS), 32, None, None, 128
        args.input_energy = None
    elif args.target_modules is None:
        args.target_modules = list(ALL_LINEAR)
    meta = calibrate(
        args.model, args.data, args.out, args.target_modules, args.rank_safety, args.max_samples,
        args.generate_responses, args.max_new_tokens, args.batch_size, energy=args.energy, contrast_data=args.contrast_data,
        input_energy=args.input_energy,
    )
    ranks = sorted(set(meta["ranks"].values()))
    print(f"{meta['basis']} safety basis, r_s {ranks[0]}..{ranks[-1]}, for {len(meta['modules'])} modules from {meta['response_tokens']} response tokens -> {args.out}")
