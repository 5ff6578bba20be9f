"""`salora align`: reproduce the demo base's shipped refusal alignment."""

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="train the refusal alignment of the embedded demo base (the shipped delta)")
    p.add_argument("--out", required=True, help="new directory for the alignment adapter (ship it as salora/resources/alignment)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benign-repeat", type=int, default=4, help="times each helpful benign conversation appears in the mix")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from salora.align import align

    record = align(args.out, args.rank, args.alpha, args.lr, args.epochs, args.batch_size, args.seed, benign_repeat=args.benign_repeat)
    print(f"alignment: {record['steps']} steps, final loss {record['final_loss']:.4f}, {record['train_seconds']:.0f}s -> {args.out}")
