"""Convert an authors' ViP²-CLIP checkpoint file + a transformers CLIP into a model folder.

    python hub/authors_checkpoint_to_folder.py --checkpoint mvtec_train_epoch_10.pth \
        --clip openai/clip-vit-large-patch14-336 --out vip2clip-mvtec

The folder then loads with `AutoModel.from_pretrained(DIR, trust_remote_code=True)`. The `.pth` files are in the
authors' repository (github.com/kim0806/ViP2-CLIP, folder models/); `vip2clip download-authors {mvtec,visa} --out
DIR` fetches the pinned one, checks its git blob id and runs this same conversion (mvtec_train_epoch_10.pth was
trained on MVTec AD: use it on anything else; visa_train_epoch_10.pth on VisA: use it on MVTec AD).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "modeling_vip2clip").is_dir() and str(ROOT) not in sys.path:  # `python hub/...` from a checkout
    sys.path.insert(0, str(ROOT))

from modeling_vip2clip.errors import UsageError  # noqa: E402
from modeling_vip2clip.cli.options import add_debug_argument, positive_int  # noqa: E402
from modeling_vip2clip.cli.boundary import run_main  # noqa: E402

__all__ = ["build_parser", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="authors' .pth file ({'prompt_learner', 'Zero_try'})")
    parser.add_argument("--clip", required=True, help="CLIP Hub id or folder at its native resolution")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--image-size", type=positive_int, default=518)
    parser.add_argument("--feature-layers", type=positive_int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--top-k", type=positive_int, default=50)
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from modeling_vip2clip.weights.authors_checkpoint import model_from_authors_checkpoint

    try:
        model = model_from_authors_checkpoint(
            args.checkpoint, args.clip, args.out,
            image_size=args.image_size, feature_layers=args.feature_layers, top_k=args.top_k,
        )
    except (ValueError, OSError) as error:  # a wrong file, a CLIP that does not fit or cannot be reached
        raise UsageError(f"{str(error).rstrip('.')}; check --checkpoint and --clip") from error
    config = model.config
    print(f"saved {args.out}: n_ctx={config.n_ctx} n_cls={config.n_cls} image_size={config.image_size} "
          f"feature_layers={config.feature_layers} top_k={config.top_k}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
