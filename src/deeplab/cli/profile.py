"""`deeplab profile`: parameters and multiply-adds of a configuration, without weights."""

from __future__ import annotations

import argparse
import json

from .flags import add_model_flags, model_config_from_flags, number


def _billions(n: int | float) -> str:
    return f"{n / 1e9:8.2f} B"


def run(args: argparse.Namespace) -> int:
    from ..models.card import model_line
    from ..models.profile import paper_table, profile_model

    size = (args.size, args.size)
    if args.paper:
        rows = paper_table(size=size)
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"Multiply-adds at {args.size}x{args.size}, 21 classes: DeepLabv3+ paper (Tables 3 and 5) vs this implementation")
        print(f"{'backbone':<16}{'OS':>4}{'decoder':>9}{'separable':>11}{'paper':>10}{'paper conv.':>13}{'error':>8}{'performed':>12}{'effective':>12}")
        for r in rows:
            err = f"{100 * r['paper_relative_error']:+.2f}%" if r["paper_reference"] else "-"
            ref = f"{r['paper_reference']:.2f} B" if r["paper_reference"] else "-"
            print(
                f"{r['backbone']:<16}{r['output_stride']:>4}{'yes' if r['decoder'] else 'no':>9}"
                f"{'yes' if r['separable'] else 'no':>11}{ref:>10}{_billions(r['multiply_adds_paper']):>13}{err:>8}"
                f"{_billions(r['multiply_adds']):>12}{_billions(r['multiply_adds_effective']):>12}"
            )
        print("paper conv.: dilated convs counted on the map padded to a multiple of the rate (TF space-to-batch)")
        return 0
    cfg = model_config_from_flags(args)
    prof, layers = profile_model(cfg, size=size)
    if args.json:
        out = prof.to_dict()
        if args.layers:
            out["layers"] = [
                {"name": c.name, "out_shape": list(c.out_shape), "dilation": c.dilation[0], "multiply_adds": c.multiply_adds,
                 "multiply_adds_effective": c.multiply_adds_effective, "multiply_adds_paper": c.multiply_adds_paper}
                for c in layers
            ]
        print(json.dumps(out))
        return 0
    print(f"{model_line(cfg)}, {args.size}x{args.size}, {cfg.num_classes} classes")  # a model card's line too
    print(f"  parameters                {prof.params / 1e6:8.2f} M")
    print(f"  multiply-adds (performed) {_billions(prof.multiply_adds)}")
    print(f"  effective (taps in map)   {_billions(prof.multiply_adds_effective)}")
    paper = ""
    if prof.paper_reference:
        paper = f"   paper: {prof.paper_reference:.2f} B ({100 * prof.to_dict()['paper_relative_error']:+.2f}%)"
    print(f"  paper convention          {_billions(prof.multiply_adds_paper)}{paper}")
    if args.layers:
        print(f"\n  {'layer':<52}{'output':>18}{'rate':>5}{'performed':>12}{'paper conv.':>13}")
        for c in layers:
            shape = "x".join(str(s) for s in c.out_shape[1:])
            print(f"  {c.name:<52}{shape:>18}{c.dilation[0]:>5}{c.multiply_adds / 1e6:>10.1f} M{c.multiply_adds_paper / 1e6:>11.1f} M")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="parameters and multiply-adds of a configuration (no weights needed)")
    add_model_flags(p)
    p.add_argument("--size", type=number(int, 17, "at least 17 pixels, e.g. 513"), default=513, help="square input size (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--paper", action="store_true", help="the DeepLabv3+ paper's table beside our counts")
    p.add_argument("--layers", action="store_true", help="per-layer breakdown")
    p.set_defaults(func=run)
