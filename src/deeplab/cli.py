"""The `deeplab` command: thin argument parsing over the library; everything testable lives elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .backbones import BACKBONES
from .config import OUTPUT_STRIDES, ModelConfig


def _add_model_flags(p: argparse.ArgumentParser, *, backbone: str = "resnet101_beta") -> None:
    p.add_argument("--backbone", default=backbone, choices=sorted(BACKBONES), help="backbone network (default %(default)s)")
    p.add_argument("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES, help="(default %(default)s)")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True, help="DeepLabv3+ decoder (default on)")
    p.add_argument("--separable", action="store_true", help="atrous separable convolution in ASPP and decoder")
    p.add_argument("--num-classes", type=int, default=21, help="(default %(default)s)")
    p.add_argument("--atrous-rates", type=_int_tuple, default=None, help="override ASPP rates, e.g. 6,12,18 ('' for none)")
    p.add_argument("--multi-grid", type=_int_tuple, default=None, help="unit rates of the last stage, e.g. 1,2,4")
    p.add_argument("--no-image-pooling", dest="image_pooling", action="store_false", help="drop the ASPP pooling branch")
    p.add_argument("--depth-multiplier", type=float, default=1.0, help="MobileNetV2 width (default %(default)s)")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 6,12,18, got {text!r}") from None


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        backbone=args.backbone,
        num_classes=args.num_classes,
        output_stride=args.output_stride,
        atrous_rates=args.atrous_rates,
        multi_grid=args.multi_grid,
        decoder=args.decoder,
        separable=args.separable,
        image_pooling=args.image_pooling,
        depth_multiplier=args.depth_multiplier,
    )


def _billions(n: int | float) -> str:
    return f"{n / 1e9:8.2f} B"


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import paper_table, profile_model

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
    cfg = _model_config(args)
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
    variant = "DeepLabv3+" if cfg.decoder else "DeepLabv3"
    print(f"{variant} {cfg.backbone}, output stride {cfg.output_stride}, ASPP rates {cfg.rates}"
          f"{', separable' if cfg.separable else ''}, {args.size}x{args.size}, {cfg.num_classes} classes")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLabv3 / DeepLabv3+ semantic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="parameters and multiply-adds of a configuration (no weights needed)")
    _add_model_flags(p)
    p.add_argument("--size", type=int, default=513, help="square input size (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--paper", action="store_true", help="the DeepLabv3+ paper's table beside our counts")
    p.add_argument("--layers", action="store_true", help="per-layer breakdown")
    p.set_defaults(func=cmd_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"deeplab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
