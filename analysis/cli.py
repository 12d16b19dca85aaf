"""`moe-vlm reproduce`: the main job on the embedded default."""

from __future__ import annotations

import argparse


def _cmd_reproduce(args) -> None:
    from .reproduce import reproduce

    reproduce(args.out, seed=args.seed, n_samples=args.n_samples, n_eval=args.n_eval)


def _cmd_analyze(args) -> None:
    from .run import analyze

    result = analyze(
        args.model,
        args.out,
        data_dir=args.data,
        init_dir=args.init,
        seed=args.seed,
        n_probe=args.n_probe,
        n_samples=args.n_samples,
        n_permutations=args.n_permutations,
    )
    last = max(result["binomial"], key=int)
    b = result["binomial"][last]
    print(f"analysis.json and {len(result['figures'])} figures -> {args.out}")
    print(f"layer {last}: binomial k={b['k']}/{b['n']} (null p={b['null_p']:.3f}) p={b['p_value']:.3g}")
    if "crossover" in result:
        print(f"crossover: +{result['crossover']['increase_pct']:.1f}% loss with routing inverted")
        print(f"collapsed layers: {result['load']['n_collapsed']}/{result['load']['n_layers']}")


def _cmd_evaluate(args) -> None:
    from .run import evaluate

    result = evaluate(args.model, args.out, data_dir=args.data, seed=args.seed, n_samples=args.n_samples)
    metrics = result["metrics"]
    keys = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)
    print(f"captioning.json -> {args.out}: {shown}")


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, helptext in (
        (
            "analyze",
            _cmd_analyze,
            "concept matrices, binomial/permutation/bootstrap, crossover, load, t-SNE, CKA",
        ),
        ("evaluate", _cmd_evaluate, "greedy captions on the test split + BLEU-4/METEOR/ROUGE-L/CIDEr"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="stage directory or Hub id")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--data", default=None, help="a saved DatasetDict (default: the Shapes world)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n-samples", type=int, default=200 if name == "analyze" else 100)
        if name == "analyze":
            p.add_argument("--init", default=None, help="Stage-0 dir: measure expert weight distance from it")
            p.add_argument(
                "--n-probe", type=int, default=None, help="images/captions per concept (default: all)"
            )
            p.add_argument("--n-permutations", type=int, default=1000)
        p.set_defaults(func=func)

    p = sub.add_parser(
        "reproduce", help="run the protocol on the embedded default (tiny models, generated data)"
    )
    p.add_argument("--out", default="runs/reproduce", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=200, help="test captions for routing/crossover analyses")
    p.add_argument("--n-eval", type=int, default=100, help="test images captioned for the metrics")
    p.set_defaults(func=_cmd_reproduce)
